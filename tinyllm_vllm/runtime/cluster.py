"""TinyLLM on a Ray cluster through Ray Serve LLM: one OpenAI endpoint over replicas, on one machine or many.

* ``serve_config`` is the application as a Ray Serve config (what ``serve run config.yaml`` reads and
  ``build_openai_app`` takes), made from the kit's settings: the prepared model, engine arguments from
  ``Settings`` (each replica's memory share from ``plan.share``), N replicas each on a fraction of one
  GPU, or autoscaling bounds. Making it imports no Ray, so it is checked on any machine.
* ``RayServe`` runs that config in a managed process (``python -m tinyllm_vllm.runtime.cluster``), which starts a
  Ray of its own or joins a cluster (``address``), and answers on ``/v1``. ``stop()`` shuts the app and a
  Ray it started down, then stops any process Ray started for it (they all carry one environment mark).

The plugin reaches Ray's workers as it reaches any vLLM process: vLLM loads it in every process through
its entry point (``vllm.general_plugins``). So the package must be installed on every node; a model
registered in the driver only is what Ray workers report as "not found".

Ray Serve LLM 2.58 runs with the CUDA build of vLLM 0.26 (the ``ray`` extra). It does not import next to
the CPU build (vLLM 0.3x for CPUs moved modules it reads), so on a CPU only the config is made and checked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyllm_vllm.errors import ServerError
from tinyllm_vllm.model.plugin import OWN_DP_PORT
from tinyllm_vllm.runtime import logs, procs, startup
from tinyllm_vllm.runtime.plan import plan, share
from tinyllm_vllm.runtime.procs import ManagedProcess
from tinyllm_vllm.settings import Settings

if TYPE_CHECKING:
    import openai

APP = "tinyllm"
# Ray's high-throughput mode (Ray >= 2.56), read where Serve starts: gRPC between replicas, vLLM's Ray V2
# executor; with the haproxy binary, HAProxy as the ingress and direct streaming (the LLM replica answers the
# HTTP request itself, no ingress deployment in between)
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "VLLM_USE_RAY_V2_EXECUTOR_BACKEND": "1"}
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1"}
INGRESS_PER_ENGINE = 4  # ingress replicas per LLM replica in the throughput mode, as Ray's own LLM benchmarks run
MARK = "TINYLLM_RAY_APP"  # every process Ray starts for one app inherits this variable: how stop() finds them
# Ray Serve LLM chooses the executor itself (Ray's); the kit's other options are the replicas' engine arguments


def throughput_env(haproxy: bool | None = None) -> dict[str, str]:
    """The environment of Ray's high-throughput mode for the processes that start Ray and Serve (``ray start``
    on every node of a cluster); HAProxy and direct streaming only where the ``haproxy`` binary is found."""
    if haproxy is None:
        haproxy = shutil.which("haproxy") is not None
    return THROUGHPUT_ENV | (HAPROXY_ENV if haproxy else {})


def serve_config(
    model: str | Path,
    settings: Settings,
    replicas: int | str = "auto",
    autoscale: tuple[int, int] | None = None,
    throughput: bool = False,
) -> dict:
    """The Ray Serve config of TinyLLM: ``replicas`` LLM servers (``auto``: the kit's plan for one GPU), or
    between ``autoscale`` = (min, max) of them, each with 1/N of a GPU and of the memory budget; as many
    ingress (HTTP) replicas as the plan gives each engine API server processes. With ``throughput`` (Ray's
    high-throughput mode, ``throughput_env``): ``INGRESS_PER_ENGINE`` per engine, or none where direct
    streaming makes the LLM replicas the ingress (the config is made for the machine it is made on)."""
    if autoscale and not 1 <= autoscale[0] <= autoscale[1]:
        raise ServerError(f"--autoscale {autoscale[0]} {autoscale[1]}: expected 1 <= MIN <= MAX")
    gpu = plan(settings, replicas if autoscale is None else autoscale[1])
    n = gpu.engines
    each = share(settings, n)
    engine = each.engine_options()
    template = Path(model) / "chat_template.jinja"
    if template.is_file():
        engine["chat_template"] = str(template)
    env = startup.cache_env(settings.home)  # the compile cache under the kit's home, as for every engine it starts
    env[OWN_DP_PORT] = "1"  # replicas starting together would race for one port (plugin.own_dp_master_port)
    bundle = {"CPU": 1}
    if settings.device == "cuda":
        bundle["GPU"] = round(1 / n, 4)
        # vLLM's Ray workers ask for this much GPU; it must fit the replica's bundle (vLLM's default is 1)
        env["VLLM_RAY_PER_WORKER_GPUS"] = str(bundle["GPU"])
    deployment: dict[str, Any] = (
        {"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1]}}
        if autoscale
        else {"num_replicas": n}
    )
    llm = {
        "model_loading_config": {"model_id": settings.served_name, "model_source": str(Path(model).resolve())},
        "engine_kwargs": engine,
        "deployment_config": deployment,
        "placement_group_config": {"bundles": [bundle]},
        "runtime_env": {"env_vars": env},
    }
    args: dict[str, Any] = {"llm_configs": [llm], "ingress_deployment_config": {"num_replicas": gpu.api_server_count}}
    if throughput:
        env |= {k: v for k, v in THROUGHPUT_ENV.items() if k.startswith("VLLM_")}  # read in the replicas
        args["ingress_deployment_config"] = {"num_replicas": INGRESS_PER_ENGINE * n}
        if "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING" in throughput_env():
            # the LLM replicas are the ingress: Ray 2.58 refuses a config for an ingress deployment
            del args["ingress_deployment_config"]
    return {
        "applications": [
            {"name": APP, "route_prefix": "/", "import_path": "ray.serve.llm:build_openai_app", "args": args}
        ]
    }


class RayServe(ManagedProcess):
    """Ray Serve LLM serving TinyLLM, as a managed subprocess (the Ray driver); OpenAI API on ``base_url``."""

    kind = "Ray Serve LLM"

    def __init__(
        self,
        model: str | Path,
        replicas: int | str = "auto",
        *,
        settings: Settings | None = None,
        address: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        autoscale: tuple[int, int] | None = None,
        throughput: bool = False,
        proxy_location: str = "EveryNode",
        startup_timeout: float = 900.0,
        echo: Callable[[str], Any] | None = print,
    ) -> None:
        self.settings = settings or Settings.from_env()
        super().__init__(None, startup_timeout, echo)
        self.config = serve_config(model, self.settings, replicas, autoscale, throughput)
        self.driver_env = throughput_env() if throughput else {}  # Serve reads it where it starts
        self.address, self.host, self.port = address, host, port
        # Serve's HTTP proxy on every node (Ray's default), or on the head only: nodes that share one host (a
        # LocalCluster) would all bind the same port
        self.proxy_location = proxy_location
        self.token = uuid.uuid4().hex
        self.ready_s: float | None = None

    @property
    def served_model_name(self) -> str:
        return self.settings.served_name

    def health_url(self) -> str:
        return self.url + "/v1/models"

    @property
    def status_file(self) -> Path:
        return self.log_file.with_suffix(".status.json")

    def start(self) -> RayServe:
        if self.running:
            return self
        self.choose_port()
        self.log_file = logs.new_log_file(self.settings.logs, f"ray-serve-{self.port}")
        config = self.log_file.with_suffix(".config.json")
        config.write_text(json.dumps(self.config, indent=2))
        cmd = [
            sys.executable,
            "-m",
            "tinyllm_vllm.runtime.cluster",
            str(config),
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        cmd += ["--status", str(self.status_file)] + (["--address", self.address] if self.address else [])
        cmd += ["--proxy-location", self.proxy_location]
        env = os.environ | {MARK: self.token, "PYTHONUNBUFFERED": "1"} | startup.cache_env(self.settings.home)
        env |= self.driver_env
        t0 = time.monotonic()
        n = self.config["applications"][0]["args"]["llm_configs"][0]["deployment_config"]
        announce = f"starting Ray Serve LLM ({n}) for {self.served_model_name} at {self.url} (log: {self.log_file})"
        self._launch(cmd, env, True, announce)
        self.ready_s = time.monotonic() - t0
        startup.record(self.settings.home, "Ray Serve LLM app", self.ready_s, self.log_file)
        if self.echo:
            self.echo(f"{self.kind} ready after {self.ready_s:.0f} s")
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Ready when Ray Serve reports the app RUNNING (every replica's engine up) and the proxy answers:
        the ingress lists the model on ``/v1/models`` before any LLM replica has started."""
        limit = timeout or self.startup_timeout
        deadline = time.monotonic() + limit
        while self.status().get("app") != "RUNNING":
            if self.proc.poll() is not None:
                raise self.failure(f"exited with code {self.proc.returncode} during start-up")
            if self.status().get("app") in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise self.failure(f"the app is {self.status()['app']}: {self.status().get('message', '')[:500]}")
            if time.monotonic() > deadline:
                raise self.failure(f"not ready after {limit:.0f} s (replicas: {self.status().get('deployments')})")
            time.sleep(1)
        super().wait_ready(max(5.0, deadline - time.monotonic()))

    def status(self) -> dict[str, Any]:
        """The app's status and its replica states per deployment, as the driver last read them (every second)."""
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}

    def replica_pids(self) -> list[int]:
        """The processes of the LLM server replicas of a Ray this app started."""
        return llm_replica_pids(self.token)

    def stop(self, grace: float = 30.0) -> int | None:
        """Shut the app (and a Ray it started) down, then stop whatever Ray process is left of it."""
        code = super().stop(grace)
        left = procs.sweep(MARK, self.token)
        if left and self.echo:
            self.echo(f"stopped {len(left)} Ray processes left after the driver exited")
        return code

    def openai_client(self, timeout: float = 120.0) -> openai.OpenAI:
        from tinyllm_vllm.client import openai_client

        return openai_client(self.base_url, timeout=timeout)


def llm_replica_pids(token: str) -> list[int]:
    """The LLM server replica processes marked ``token`` (Ray names them ``ray::ServeReplica:...LLMServer...``):
    those of an app's own Ray (``RayServe.token``), or of one node of a ``LocalCluster`` (``node_tokens``)."""
    out = []
    for pid in procs.marked(MARK, token):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::ServeReplica") and "LLMServer" in title:
            out.append(pid)
    return out


class LocalCluster:
    """A Ray cluster of several nodes on this machine: ``ray start --head`` and ``ray start --address`` for each
    other node, each with its own share of the CPUs and its own view of the GPU (``gpus`` each). Every process
    a node starts carries that node's mark (``node_tokens``), so what runs where can be read, one node's raylet
    killed (``kill_node``), and everything stopped. It shows scheduling, the plugin in workers of another
    node and recovery from a lost node; not the network, shared storage or NCCL between real hosts."""

    def __init__(self, home: Path, nodes: int = 2, gpus: float = 1, echo: Callable[[str], Any] | None = print):
        self.home, self.nodes, self.gpus, self.echo = Path(home), nodes, gpus, echo
        self.node_tokens = [uuid.uuid4().hex for _ in range(nodes)]
        self.groups: list[tuple[Any, Path]] = []  # each node's process group and its log
        self.port: int | None = None
        self.temp_dir: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> LocalCluster:
        """Start the nodes, the head first, each within ``timeout`` s. On a loaded machine a node can miss one
        of Ray's own start-up waits (its raylet's fixed 30 s to register, its agents' health checks) while
        nothing is wrong with the cluster: the whole cluster is then started once more, and a second failure
        stands, quoting the node's log."""
        try:
            try:
                return self._start_nodes(timeout)
            except ServerError as e:
                self.stop()
                if self.echo:
                    self.echo(f"the Ray cluster did not start; starting it again. {e}")
                return self._start_nodes(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_nodes(self, timeout: float) -> LocalCluster:
        with procs.hold_port() as held:  # a free port for the head's GCS (Ray binds it itself)
            self.port = held.getsockname()[1]
        cpus = max(1, len(os.sched_getaffinity(0)) // self.nodes)
        common = ["--num-cpus", str(cpus), "--num-gpus", str(self.gpus), "--block", "--disable-usage-stats"]
        common += ["--node-ip-address", "127.0.0.1"]  # one machine: every node on the loopback
        # Ray's session files in a folder of this cluster's: `ray start --head` otherwise names itself the
        # machine's current cluster (/tmp/ray/ray_current_cluster), which every later ray.init() without an
        # address would try to join, long after this cluster is gone (a short path: Ray's sockets live there)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="tinyllm-ray-"))
        for i, token in enumerate(self.node_tokens):
            where = ["--head", "--port", str(self.port), "--include-dashboard=false"] if i == 0 else []
            where = where or ["--address", self.address]
            where += ["--temp-dir", str(self.temp_dir)] if i == 0 else []
            env = os.environ | {MARK: token, "RAY_TMPDIR": str(self.temp_dir)} | startup.cache_env(self.home)
            log = logs.new_log_file(self.home / "logs", f"ray-node-{i}")
            self.groups.append((procs.start_group([self._ray_cli(), "start", *where, *common], log, env), log))
            self._wait_nodes(i + 1, timeout)
            if self.echo:
                self.echo(f"Ray node {i + 1}/{self.nodes} up ({'head' if i == 0 else 'worker'}, {cpus} CPUs)")
        return self

    @staticmethod
    def _ray_cli() -> str:
        found = shutil.which("ray", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        if not found:
            raise ServerError("the ray command was not found: pip install 'tinyllm-vllm[ray-data]'")
        return found

    def alive_nodes(self) -> int:
        """Nodes the cluster counts alive, asked of its GCS from a short process (this one stays out of Ray)."""
        code = f"import ray; ray.init(address='{self.address}', logging_level='ERROR'); "
        code += "print('ALIVE', sum(n['Alive'] for n in ray.nodes()))"
        env = os.environ | {"RAY_TMPDIR": str(self.temp_dir)}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        said = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("ALIVE ")]  # Ray prints too
        return int(said[-1]) if r.returncode == 0 and said else 0

    def _wait_nodes(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive_nodes() < n:
            for g, log in self.groups:
                if g.poll() is not None:
                    raise ServerError(
                        f"a Ray node exited during start-up (exit {g.returncode})\n"
                        f"--- last lines of {log} ---\n{logs.tail(log, 25)}"
                    )
            if time.monotonic() > deadline:
                log = self.groups[-1][1]
                raise ServerError(
                    f"the Ray cluster had fewer than {n} nodes after {timeout:g} s\n"
                    f"--- last lines of {log} ---\n{logs.tail(log, 25)}"
                )
            time.sleep(2)

    def replicas_per_node(self) -> list[int]:
        """LLM server replicas running on each node."""
        return [len(llm_replica_pids(t)) for t in self.node_tokens]

    def kill_node(self, i: int) -> None:
        """SIGKILL node ``i``'s raylet, as a host that fails would lose it; its workers go with it."""
        for pid in procs.marked(MARK, self.node_tokens[i]):
            try:
                if b"raylet" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                continue

    def stop(self) -> None:
        """Stop every node and whatever process any of them started."""
        for g, _ in reversed(self.groups):
            procs.stop_group(g, grace=10)
        for token in self.node_tokens:
            procs.sweep(MARK, token)
        self.groups = []
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _app_status(app: Any) -> dict[str, Any]:
    """What ``RayServe.status`` reads: the app's state and message, and each deployment's replica counts
    by state. Ray 2.58 gives the states as plain strings, earlier releases as enums: both read the same."""

    def name(state: Any) -> str:
        return str(getattr(state, "value", state))

    return {
        "app": name(app.status),
        "message": app.message,
        "deployments": {d: {name(k): n for k, n in s.replica_states.items()} for d, s in app.deployments.items()},
    }


def _driver(argv: list[str]) -> None:
    """The Ray driver ``RayServe`` runs: start or join Ray, run the app, report its status, shut down on a signal."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tinyllm_vllm.runtime.cluster")
    p.add_argument("config")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", help="a running Ray cluster (default: start one on this machine)")
    p.add_argument("--status", help="write the replica states here every second")
    p.add_argument("--proxy-location", default="EveryNode", choices=["EveryNode", "HeadOnly"])
    a = p.parse_args(argv)
    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    app = json.loads(Path(a.config).read_text())["applications"][0]
    # "local": a Ray of its own even where `ray start` left /tmp/ray/ray_current_cluster behind
    ray.init(address=a.address or "local", include_dashboard=False, log_to_driver=True)
    # after ray.init: it installs handlers of its own that end the driver on SIGTERM without shutting down
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    try:
        serve.start(http_options={"host": a.host, "port": a.port}, proxy_location=a.proxy_location)
        serve.run(build_openai_app(app["args"]), name=app["name"], route_prefix=app["route_prefix"], blocking=False)
        print(f"Ray Serve LLM: application {app['name']} deployed", flush=True)
        while not stopping:
            if a.status:
                Path(a.status + ".tmp").write_text(json.dumps(_app_status(serve.status().applications[app["name"]])))
                os.replace(a.status + ".tmp", a.status)
            time.sleep(1)
    finally:
        if a.address:  # a cluster shared with others: take down this app only, and leave Ray running
            serve.delete(app["name"])
        else:
            serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    _driver(sys.argv[1:])
