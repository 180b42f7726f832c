"""Several vLLM servers of one model behind one OpenAI endpoint, with vLLM's router (``vllm-router``).

A 92M model leaves a GPU mostly idle: one engine is bound by its own host work (scheduling and
output processing in Python), so N engines side by side, each a full server with 1/N of the GPU's
memory, serve more. ``plan`` picks N (``auto``: from CPU cores, GPU memory and the measured useful
count) and the options that measured best; ``share`` is the one memory-share rule. ``Replicas``
starts the servers (each with a fixed KV-cache size, so vLLM's memory profiling does not race; the first
with priority, and on a GPU alone until its model is loaded), answers through ``vllm-router`` as soon as
one is ready, adds the others to the router as each becomes ready, and stops them together::

    with Replicas(model_dir, "auto") as endpoint:    # or tinyllm-vllm serve (--replicas auto on a GPU)
        client = endpoint.openai_client()            # answers now, on the first replica
        endpoint.wait_all()                          # full capacity (a benchmark waits for it)

Every server and the router run under the kit's watchdog (``procs``), so all of them stop on
``stop()``, at interpreter exit and when the process that started them dies.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyllm_vllm.errors import ServerError
from tinyllm_vllm.runtime import logs, procs, startup
from tinyllm_vllm.runtime.plan import GpuPlan, cores_env, plan, share
from tinyllm_vllm.runtime.procs import ManagedProcess, hold_port
from tinyllm_vllm.runtime.server import VLLMServer
from tinyllm_vllm.settings import Settings

if TYPE_CHECKING:
    import openai

JOINER_NICE = 10  # the niceness of replicas 2..N while the first starts
# staggered starts: replicas 2..N start once the first has its model on the device (the start timeline's
# weights line), or after STAGGER_MAX_S at the most
STAGGER_UNTIL = re.compile(dict(logs.TIMELINE)["weights_s"])
STAGGER_MAX_S = 90.0
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

    def add_worker(self, url: str) -> None:
        """Add a ready server to the running router (vllm-router's ``/add_worker``): it takes requests at once."""
        import httpx

        r = httpx.post(f"{self.url}/add_worker", params={"url": url}, timeout=60)
        if r.status_code >= 400:
            raise ServerError(f"vllm-router refused the worker {url}: HTTP {r.status_code} {r.text[:300]}")

    def workers(self) -> list[str]:
        """The worker URLs the router routes to now (``/list_workers``)."""
        import httpx

        return list(httpx.get(f"{self.url}/list_workers", timeout=10).json().get("urls", []))

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
        stagger: bool | None = None,
    ) -> None:
        settings = settings or Settings.from_env()
        # on a GPU the replicas' starts contend for the one device (CUDA start, vLLM's warm-up), which no CPU
        # priority eases: measured on an H200, 4 replicas started at once were ready within 2 s of each other,
        # so nothing answered before all did. Staggered, the first starts alone; on a CPU each replica has
        # cores of its own and all start at once
        self.stagger = settings.device == "cuda" if stagger is None else stagger
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
        # on a CPU each replica gets cores of its own; an environment the caller passes wins
        self.servers = [
            VLLMServer(model, vllm_args, settings=each, env=cores_env(settings, i, n) | (env or {}), echo=None)
            for i in range(n)
        ]
        for i, server in enumerate(self.servers):
            server.what = f"replica {i + 1}/{n}"
        self.joined: list[VLLMServer] = []  # in the router, in the order they became ready
        self.failed: list[str] = []  # replicas that did not start, and why
        self.first_answer_s: float | None = None
        self.all_ready_s: float | None = None
        self._joiner: threading.Thread | None = None
        self._stopping = threading.Event()
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
        """Start every server, the first with priority (``stagger``: alone until its model is loaded); answer as
        soon as one is ready (the router up with that one), and add the others to the router as each becomes
        ready (``joined``, ``wait_all``).
        On a failure before the first answer everything started is stopped; a later replica that fails is
        reported and left out, the endpoint keeps answering."""
        t0 = time.monotonic()
        if self.echo:
            took = startup.expected(self.settings.home, "replica")
            self.echo(f"starting {self.plan.why}{f' ({took})' if took else ''}")
        # later replicas yield the CPU to the first while it starts (their niceness goes back to 0 as soon as it
        # answers, which needs root: elsewhere they start as equals, and the first ready one answers first)
        prioritise = len(self.servers) > 1 and os.geteuid() == 0
        try:
            for i, server in enumerate(self.servers):
                if i == 1 and self.stagger:
                    self._until_loaded(self.servers[0], t0)
                server.nice = JOINER_NICE if prioritise and i > 0 else 0
                server.start(wait=False)
            first = self._first_ready(t0)
            first.wait_ready()  # it answers: this records its start
            for server in self.servers:  # the first is up: the others get the CPU back (or load would starve them)
                if server.nice:
                    procs.renice_group(server.proc.pid, 0)
            self.router.worker_urls = [first.url]
            self.router.start()
        except BaseException as e:
            self.stop(grace=2 if isinstance(e, KeyboardInterrupt) else 20)
            raise
        self.first_answer_s = time.monotonic() - t0
        self.joined = [first]
        rest = [s for s in self.servers if s is not first]
        if self.echo:
            others = f"; the other {len(rest)} join as they are ready" if rest else ""
            after = f"after {self.first_answer_s:.0f} s{others}"
            self.echo(
                f"{first.what} ready ({first.url}): answering at {self.url} {after} "
                f"(router log: {self.router.log_file})"
            )
        if rest:
            self._joiner = threading.Thread(target=self._join, args=(rest, t0), daemon=True)
            self._joiner.start()
        else:
            self.all_ready_s = self.first_answer_s
        return self

    def _until_loaded(self, first: VLLMServer, t0: float) -> None:
        """Wait until ``first`` has its model on the device, is ready, or STAGGER_MAX_S have passed (a server that
        exited raises: nothing else is started)."""
        if self.echo:
            self.echo(
                f"{first.what} starts alone until its model is loaded, then the other {len(self.servers) - 1} "
                "(their starts would slow its start on the one GPU)"
            )
        while time.monotonic() - t0 < STAGGER_MAX_S and not first.is_ready():
            log = first.log_file.read_text(errors="replace") if first.log_file and first.log_file.exists() else ""
            if STAGGER_UNTIL.search(log):
                return
            time.sleep(0.25)

    def _first_ready(self, t0: float) -> VLLMServer:
        timeout = max(s.startup_timeout for s in self.servers)
        while True:
            for server in self.servers:
                if server.is_ready():  # a server that exited raises: nothing answers yet, so all stop
                    return server
            if time.monotonic() - t0 > timeout:
                raise self.servers[0].failure(f"no replica ready after {timeout:.0f} s")
            time.sleep(0.25)

    def _join(self, rest: list[VLLMServer], t0: float) -> None:
        """The joiner thread: each replica into the router the moment it is ready."""
        pending = list(rest)
        while pending and not self._stopping.is_set():
            for server in list(pending):
                try:
                    if not server.is_ready():
                        if time.monotonic() - t0 > server.startup_timeout:
                            raise server.failure(f"not ready after {server.startup_timeout:.0f} s")
                        continue
                    server.wait_ready()  # ready: this records its start
                    self.router.add_worker(server.url)
                except Exception as e:
                    pending.remove(server)
                    if self._stopping.is_set():
                        return
                    self.failed.append(f"{server.what}: {str(e).splitlines()[0]}")
                    server.stop(grace=5)
                    if self.echo:
                        self.echo(f"{server.what} failed to start and is left out: {self.failed[-1]}")
                    continue
                pending.remove(server)
                self.joined.append(server)
                if self.echo:
                    self.echo(
                        f"{server.what} joined after {time.monotonic() - t0:.0f} s "
                        f"({len(self.joined)} of {len(self.servers)} answering; {server.url}, log: {server.log_file})"
                    )
            time.sleep(0.25)
        if not self._stopping.is_set():
            self.all_ready_s = time.monotonic() - t0
            if self.echo:
                full = "full capacity" if not self.failed else f"{len(self.failed)} left out"
                n, seconds = len(self.servers), self.all_ready_s
                self.echo(f"{len(self.joined)} of {n} replicas answering after {seconds:.0f} s: {full}")

    def wait_all(self, timeout: float | None = None) -> Replicas:
        """Wait until every replica has joined the router (a benchmark wants full capacity); ServerError if
        one failed to start."""
        if self._joiner is not None:
            self._joiner.join(timeout)
            if self._joiner.is_alive():
                raise ServerError(f"replicas: {len(self.joined)} of {len(self.servers)} joined within {timeout} s")
        if self.failed:
            raise ServerError("replicas failed to start: " + "; ".join(self.failed))
        return self

    def stop(self, grace: float = 20.0) -> None:
        """Stop the router, then every server (each with its whole process group)."""
        self._stopping.set()
        if self._joiner is not None and self._joiner is not threading.current_thread():
            self._joiner.join(timeout=10)
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
