"""Several vLLM servers of one model behind one OpenAI endpoint, with vLLM's router (``vllm-router``).

A 92M model leaves a GPU mostly idle: one engine is bound by its own host work (scheduling and
output processing in Python), so N engines side by side, each a full server with 1/N of the GPU's
memory, serve more. ``plan`` picks N (``auto``: from CPU cores, GPU memory and the measured useful
count) and the options that measured best; ``share`` is the one memory-share rule. ``Replicas``
starts the servers at the same time (each with a fixed KV-cache size, so vLLM's memory profiling does
not race), then ``vllm-router`` in front, and stops them together::

    with Replicas(model_dir, "auto") as endpoint:    # or tinyllm-vllm serve (--replicas auto on a GPU)
        client = endpoint.openai_client()

Every server and the router run under the kit's watchdog (``procs``), so all of them stop on
``stop()``, at interpreter exit and when the process that started them dies.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyllm_vllm.errors import ServerError
from tinyllm_vllm.runtime import logs
from tinyllm_vllm.runtime.plan import GpuPlan, plan, share
from tinyllm_vllm.runtime.procs import ManagedProcess, hold_port
from tinyllm_vllm.runtime.server import VLLMServer
from tinyllm_vllm.settings import Settings

if TYPE_CHECKING:
    import openai

POLICIES = ("round_robin", "power_of_two", "cache_aware", "random")
# Servers on other hosts fail in more ways than local replicas: the router retries a request on another worker
# (3 times, backing off), and a worker that fails 5 times in a row is left out for 30 s, then tried again
# (closed again after 2 successes); every worker's /health is polled every 2 s.
REMOTE_POLICY = [
    "--retry-max-retries", "3",
    "--cb-failure-threshold", "5",
    "--cb-timeout-duration-secs", "30",
    "--cb-success-threshold", "2",
]  # fmt: skip
REMOTE_POLICY_TEXT = (
    "health checks every 2 s; a failed request retried up to 3 times on another worker; a worker that fails "
    "5 times in a row is left out for 30 s"
)


def check_worker_urls(urls: Sequence[str]) -> list[str]:
    """Worker base URLs as vllm-router wants them (scheme, host, port; no /v1); a bad one is named."""
    from urllib.parse import urlparse

    out = []
    for url in urls:
        u = urlparse(url)
        if u.scheme not in ("http", "https") or not u.hostname or not u.port:
            raise ServerError(f"--workers {url}: expected http://HOST:PORT of a vLLM server")
        out.append(f"{u.scheme}://{u.hostname}:{u.port}")
    return out


class Router(ManagedProcess):
    """``vllm-router`` in front of running vLLM servers, as a managed subprocess."""

    kind = "vllm-router"
    shares_held_port = False  # it binds without SO_REUSEPORT: both ports are let go just before it starts

    def __init__(
        self,
        worker_urls: Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        policy: str = "round_robin",
        log_file: Path,
        router_args: Sequence[str] = (),
        startup_timeout: float = 120.0,
        echo: Callable[[str], Any] | None = print,
    ) -> None:
        if policy not in POLICIES:
            raise ServerError(f"router policy {policy!r}: expected one of {', '.join(POLICIES)}")
        super().__init__(log_file, startup_timeout, echo)
        self.worker_urls, self.host, self.port, self.policy = list(worker_urls), host, port, policy
        self.router_args = list(router_args)
        self.metrics_port: int | None = None

    def command(self) -> list[str]:
        metrics = []
        if "--prometheus-port" not in self.router_args:
            # its default, 29000, is fixed: a second router on the machine would fail to start on it
            metrics = ["--prometheus-host", self.host, "--prometheus-port", str(self.metrics_port or 0)]
        return [
            sys.executable,
            "-m",
            "vllm_router.launch_router",
            "--worker-urls",
            *self.worker_urls,
            "--host",
            self.host,
            "--port",
            str(self.port or 0),
            "--policy",
            self.policy,
            # notice a dead replica within seconds, not the default minute
            "--health-check-interval-secs",
            "2",
            "--health-failure-threshold",
            "2",
            *metrics,
            *self.router_args,
        ]

    def health_url(self) -> str:
        return self.url + "/health"

    def start(self) -> Router:
        if not self.running:
            self.choose_port()
            if not self.metrics_port and "--prometheus-port" not in self.router_args:
                with hold_port(self.host) as held:  # the OS picks it; let go at once, as the router's own port
                    self.metrics_port = held.getsockname()[1]
            self._launch(self.command(), logs.own_logging_env())
        return self


def _has_flag(args: Sequence[str], flag: str) -> bool:
    """Whether ``args`` set ``flag``, as ``--flag VALUE`` or ``--flag=VALUE``."""
    return any(a == flag or a.startswith(flag + "=") for a in args)


class Replicas:
    """N vLLM servers of one model sharing the machine's GPU, behind ``vllm-router``: one endpoint."""

    kind = "replicas"

    def __init__(
        self,
        model: str | Path,
        n: int | str | GpuPlan = "auto",
        vllm_args: Sequence[str] = (),
        *,
        settings: Settings | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        policy: str = "round_robin",
        router_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        echo: Callable[[str], Any] | None = print,
        light: bool = False,
    ) -> None:
        settings = settings or Settings.from_env()
        self.plan = plan(settings, n, light)  # a plan the caller decided is used as it is, with its reason
        n = self.plan.engines
        self.settings, self.echo = settings, echo
        each = share(settings, n)
        if settings.device == "cuda" and not _has_flag(vllm_args, "--api-server-count"):
            vllm_args = ["--api-server-count", str(self.plan.api_server_count), *vllm_args]
        backend = self.plan.engine_options.get("distributed_executor_backend")
        if settings.device == "cuda" and backend and not _has_flag(vllm_args, "--distributed-executor-backend"):
            vllm_args = ["--distributed-executor-backend", backend, *vllm_args]
        # the servers say nothing themselves: one line a replica is enough for N of them
        self.servers = [VLLMServer(model, vllm_args, settings=each, env=env, echo=None) for _ in range(n)]
        for i, server in enumerate(self.servers):
            server.what = f"replica {i + 1}/{n}"
        self.router = Router(
            [],
            host=host,
            port=port,
            policy=policy,
            router_args=router_args,
            log_file=logs.new_log_file(settings.logs, "vllm-router"),
            echo=echo,
        )

    @property
    def served_model_name(self) -> str:
        return self.servers[0].served_model_name

    @property
    def url(self) -> str:
        return self.router.url

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def log_file(self) -> Path | None:
        return self.router.log_file

    @property
    def running(self) -> bool:
        return self.router.running and any(s.running for s in self.servers)

    def start(self) -> Replicas:
        """Start the servers at the same time (each with a fixed memory share), then the router; on any
        failure stop everything started."""
        t0 = time.monotonic()
        if self.echo:
            self.echo(f"starting {self.plan.why}")
        try:
            for server in self.servers:
                server.start(wait=False)
            for i, server in enumerate(self.servers):
                server.wait_ready()
                if self.echo:
                    self.echo(
                        f"replica {i + 1}/{len(self.servers)} ready after {time.monotonic() - t0:.0f} s "
                        f"(log: {server.log_file})"
                    )
            self.router.worker_urls = [s.url for s in self.servers]
            self.router.start()
        except BaseException as e:
            self.stop(grace=2 if isinstance(e, KeyboardInterrupt) else 20)
            raise
        if self.echo:
            self.echo(
                f"{len(self.servers)} replicas behind vllm-router at {self.url}, ready after "
                f"{time.monotonic() - t0:.0f} s (router log: {self.router.log_file})"
            )
        return self

    def stop(self, grace: float = 20.0) -> None:
        """Stop the router, then every server (each with its whole process group)."""
        self.router.stop(grace)
        for server in self.servers:
            server.stop(grace)

    def __enter__(self) -> Replicas:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(f"--- {s.log_file}\n{s.log_tail(lines)}" for s in self.servers if not s.running) or (
            self.router.log_tail(lines)
        )

    def openai_client(self, timeout: float = 120.0) -> openai.OpenAI:
        from tinyllm_vllm.client import openai_client

        return openai_client(self.base_url, timeout=timeout)


def endpoint(
    model: str | Path,
    gpu: GpuPlan,
    vllm_args: Sequence[str] = (),
    *,
    settings: Settings,
    api_key: str | None = None,
    echo: Callable[[str], Any] | None = print,
    **kw: Any,
) -> VLLMServer | Replicas:
    """What ``serve`` starts for a plan: one server, or the plan's replicas behind vllm-router. The rule for
    ``--api-key`` lives here: vllm-router passes no key on to the servers, so a key means one server."""
    if echo:
        echo(f"plan: {gpu.why}")
    if gpu.engines > 1 and api_key:
        if echo:
            echo("--api-key: one server instead of replicas (vllm-router passes no key on to the servers)")
    elif gpu.engines > 1:
        return Replicas(model, gpu, vllm_args, settings=settings, echo=echo, **kw)
    return VLLMServer(model, vllm_args, settings=settings, api_key=api_key, echo=echo, **kw)
