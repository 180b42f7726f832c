"""A handle on vLLM's OpenAI-compatible server running as a subprocess (``vllm serve``).

Modelled on vLLM's own test helper ``RemoteOpenAIServer``: vLLM's flags are the interface. The
settings give the engine options (dtype, context length, memory, eager mode), every other flag
passes through ``vllm_args`` as it would on the command line::

    with VLLMServer(model_dir, vllm_args=["--max-num-seqs", "128"]) as server:
        client = server.openai_client()

The server starts in its own process group under a watchdog (``procs``), logs to a file, and is
waited for on ``/health`` with a deadline; a failed start is reported with the cause found in the
log first, then the log's tail. ``stop()`` stops the whole group; it also runs at interpreter exit,
and the watchdog stops the group when the process that started it dies.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import httpx

from . import logs, procs
from .errors import ServerError
from .settings import Settings

if TYPE_CHECKING:
    import openai


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def vllm_command(*args: str) -> list[str]:
    """The ``vllm`` command line run by this Python, on the CUDA and the CPU build alike (``vllm_cli``)."""
    return [sys.executable, "-m", "tinyllm_vllm.vllm_cli", *args]


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value given to ``flag`` in an argument list (``--flag V`` or ``--flag=V``), or None."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


class ManagedProcess:
    """A process group started by the kit: log file, readiness on an HTTP health URL, stop, cleanup at exit."""

    kind = "process"

    def __init__(self, log_file: Path | None, startup_timeout: float, echo: Callable[[str], Any] | None) -> None:
        self.log_file = log_file
        self.startup_timeout = startup_timeout
        self.echo = echo
        self.proc: subprocess.Popen | None = None
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._finalizer: weakref.finalize | None = None

    def _launch(self, cmd: list[str], env: dict[str, str], wait: bool = True, announce: str | None = None) -> None:
        """Start ``cmd`` (which names ``self.port``), echo ``announce``, and with ``wait`` wait until it is ready.
        A taken port is refused before anything starts; on any failure, Ctrl-C included (within about two
        seconds), the process group is stopped again."""
        if not port_is_free(self.host, self.port):
            raise ServerError(
                f"{self.kind} failed: port {self.port} on {self.host} is already in use: "
                f"pick another port, or stop what listens there"
            )
        self.proc = procs.start_group(cmd, self.log_file, env)
        self._finalizer = weakref.finalize(self, procs.stop_group, self.proc, 10.0)
        atexit.register(self._finalizer)
        if announce and self.echo:
            self.echo(announce)
        if not wait:
            return
        try:
            self.wait_ready()
        except KeyboardInterrupt:
            self.stop(grace=2)
            raise
        except BaseException:
            self.stop()
            raise

    def health_url(self) -> str:
        raise NotImplementedError

    def start(self) -> Self:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll the health URL until it answers 200; raise ServerError if the process exits or time runs out."""
        limit = timeout or self.startup_timeout
        deadline = time.monotonic() + limit
        while True:
            code = self.proc.poll()
            if code is not None:
                raise self.failure(f"exited with code {code} during start-up")
            try:
                if httpx.get(self.health_url(), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise self.failure(f"not ready after {limit:.0f} s")
            time.sleep(0.25)

    def failure(self, what: str) -> ServerError:
        """An error whose first line names the cause found in the log, then the log's tail."""
        text = self.log_file.read_text(errors="replace") if self.log_file and self.log_file.exists() else ""
        cause = logs.diagnose(text, self.port)
        headline = f"{self.kind} failed: {cause} ({what})" if cause else f"{self.kind} {what}"
        return ServerError(f"{headline}\n--- last lines of {self.log_file} ---\n{logs.tail(self.log_file)}")

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds. Idempotent; returns the exit code."""
        if self.proc is None:
            return None
        if self._finalizer is not None:
            atexit.unregister(self._finalizer)
            self._finalizer.detach()
            self._finalizer = None
        return procs.stop_group(self.proc, grace)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return logs.tail(self.log_file, lines)


class VLLMServer(ManagedProcess):
    """vLLM's OpenAI server on a prepared TinyLLM checkpoint, as a managed subprocess."""

    kind = "vLLM server"

    def __init__(
        self,
        model: str | Path,
        vllm_args: Sequence[str] = (),
        *,
        settings: Settings | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: str | None = None,
        env: dict[str, str] | None = None,
        log_file: str | Path | None = None,
        startup_timeout: float = 600.0,
        echo: Callable[[str], Any] | None = print,
    ) -> None:
        self.settings = settings or Settings.from_env()
        super().__init__(Path(log_file) if log_file else None, startup_timeout, echo)
        self.model = Path(model)
        self.vllm_args = list(vllm_args)
        self.host, self.port, self.api_key = host, port, api_key
        self.env = env or {}
        # the training-format template written by prepare; passed explicitly so the server's log says so
        template = self.model / "chat_template.jinja"
        self.chat_template = template if template.is_file() else None

    @property
    def served_model_name(self) -> str:
        return flag_value(self.vllm_args, "--served-model-name") or self.settings.served_name

    @property
    def max_model_len(self) -> int:
        return int(flag_value(self.vllm_args, "--max-model-len") or self.settings.max_model_len)

    def command(self) -> list[str]:
        """The exact command line the server is started with (a free port is picked if none was given)."""
        if self.port is None:
            self.port = free_port(self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1")
        cmd = vllm_command(
            "serve",
            str(self.model),
            "--served-model-name",
            self.settings.served_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self.settings.server_flags(),
        )
        if self.chat_template:
            cmd += ["--chat-template", str(self.chat_template)]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd + self.vllm_args  # later flags win: vllm_args override the settings

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def health_url(self) -> str:
        return self.url + "/health"

    def start(self, wait: bool = True) -> VLLMServer:
        """Launch the server (and by default wait until it answers). Stops it again on any failure,
        also on Ctrl-C / a Jupyter interrupt, within about two seconds."""
        if self.running:
            return self
        cmd = self.command()
        if self.log_file is None:
            self.log_file = logs.new_log_file(self.settings.logs, f"vllm-server-{self.port}")
        env = os.environ | {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "PYTHONUNBUFFERED": "1"} | self.env
        t0 = time.monotonic()
        announce = f"starting {self.kind} for {self.served_model_name} at {self.url} (log: {self.log_file})"
        self._launch(cmd, env, wait, announce if wait else None)
        if not wait:
            return self
        if self.echo:
            self.echo(f"{self.kind} ready after {time.monotonic() - t0:.0f} s")
        return self

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"VLLMServer({self.served_model_name!r} at {self.url}, {state}, log={self.log_file})"

    def openai_client(self, timeout: float = 120.0) -> openai.OpenAI:
        """An ``openai.OpenAI`` client bound to this server (no retries: failures are loud)."""
        from .client import openai_client

        return openai_client(self.base_url, api_key=self.api_key, timeout=timeout)
