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

import argparse
import atexit
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import httpx

from . import logs, procs, startup
from .errors import ServerError
from .ports import DEFAULT_PORT, free_port, port_is_free, reserve_port  # noqa: F401  (re-exported)
from .settings import Settings

if TYPE_CHECKING:
    import openai


def vllm_command(*args: str) -> list[str]:
    """The ``vllm`` command line run by this Python, on the CUDA and the CPU build alike (``vllm_cli``)."""
    return [sys.executable, "-m", "tinyllm_vllm.vllm_cli", *args]


def parse_serve_args(args: Sequence[str]) -> argparse.Namespace:
    """``vllm serve`` arguments read back with vLLM's own parser (as vLLM's ``RemoteOpenAIServer`` does):
    later flags win, and an unknown or malformed flag is refused here, before anything starts."""
    import contextlib
    import io

    from . import vllm_cli  # noqa: F401  (vLLM's version lookup on the CPU build)

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older vLLM
        from vllm.utils import FlexibleArgumentParser
    from vllm.entrypoints.cli.serve import ServeSubcommand

    parser = FlexibleArgumentParser(prog="vllm serve")
    parser = ServeSubcommand().subparser_init(parser.add_subparsers(required=False, dest="subparser"))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(list(args)[1:])  # the subcommand parser: without "serve"
    except SystemExit:
        message = (err.getvalue().strip().splitlines() or ["invalid arguments"])[-1]
        raise ServerError(f"vllm serve {' '.join(args[1:])}: {message.removeprefix('vllm serve: ')}") from None


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
        self._held: socket.socket | None = None  # the port, held until the process listens on it
        self._finalizer: weakref.finalize | None = None

    def _launch(self, cmd: list[str], env: dict[str, str], wait: bool = True, announce: str | None = None) -> None:
        """Start ``cmd`` (which names ``self.port``), echo ``announce``, and with ``wait`` wait until it is ready.
        A taken port is refused before anything starts; on any failure, Ctrl-C included (within about two
        seconds), the process group is stopped again."""
        if self._held is None and not port_is_free(self.host, self.port):
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

    def release_port(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    @property
    def url(self) -> str:
        """Where a client on this machine reaches the process (a wildcard bind is reached on 127.0.0.1)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI API's base URL (``/v1``)."""
        return self.url + "/v1"

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
                    self.release_port()  # it listens: the port needs holding no longer
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
        self.release_port()
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
        self._args: argparse.Namespace | None = None
        self._started_at = 0.0
        self.what = "server"  # what the start record calls it ("replica 2/4" for a replica)
        # the training-format template written by prepare; passed explicitly so the server's log says so
        template = self.model / "chat_template.jinja"
        self.chat_template = template if template.is_file() else None

    @property
    def args(self) -> argparse.Namespace:
        """The server's arguments as vLLM reads them: the one source of its name, length and port."""
        if self._args is None:
            if self.vllm_args:
                self._args = parse_serve_args(self.command())
            else:  # nothing to read back: every value is the settings' (and vLLM's parser costs seconds)
                self.command()
                self._args = argparse.Namespace(
                    served_model_name=[self.settings.served_name],
                    max_model_len=self.settings.max_model_len,
                    port=self.port,
                )
        return self._args

    @property
    def served_model_name(self) -> str:
        names = self.args.served_model_name
        return names[0] if isinstance(names, list) else names or str(self.model)

    @property
    def max_model_len(self) -> int:
        return int(self.args.max_model_len)

    def command(self) -> list[str]:
        """The ``vllm serve`` arguments the server is started with (a held free port if none was given)."""
        if self.port is None or self.port == 0:
            self._held = reserve_port(self.host)
            self.port = self._held.getsockname()[1]
        cmd = [
            "serve",
            str(self.model),
            "--served-model-name",
            self.settings.served_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self.settings.server_flags(),
        ]
        if self.chat_template:
            cmd += ["--chat-template", str(self.chat_template)]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd + self.vllm_args  # later flags win: vllm_args override the settings

    def health_url(self) -> str:
        return self.url + "/health"

    def start(self, wait: bool = True) -> VLLMServer:
        """Launch the server (and by default wait until it answers). Stops it again on any failure,
        also on Ctrl-C / a Jupyter interrupt, within about two seconds."""
        if self.running:
            return self
        cmd = vllm_command(*self.command())
        self._args = None
        if self.args.port != self.port:  # a --port in vllm_args wins, as on vLLM's command line
            self.release_port()
            self.port = self.args.port
        if self.log_file is None:
            self.log_file = logs.new_log_file(self.settings.logs, f"vllm-server-{self.port}")
        # the server logs to its own file: never to a log file an in-process engine set up for itself
        env = logs.own_logging_env() | startup.cache_env(self.settings.home)
        # vLLM picks how its helper processes start (fork where it is safe, which skips a second import
        # of torch and vLLM per process): no start method is forced here
        env |= {"PYTHONUNBUFFERED": "1"} | self.env
        t0 = time.monotonic()
        announce = f"starting {self.kind} for {self.served_model_name} at {self.url} (log: {self.log_file})"
        self._started_at = t0
        self._launch(cmd, env, wait, announce if wait else None)
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the server answers on /health, echoing one line per start phase; record the start."""
        with startup.PhaseEcho(self.log_file, self.echo):
            super().wait_ready(timeout)
        seconds = time.monotonic() - self._started_at
        startup.record(self.settings.home, self.what, seconds, self.log_file, port=self.port)
        if self.echo:
            self.echo(f"{self.kind} ready after {seconds:.0f} s")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"VLLMServer({self.served_model_name!r} at {self.url}, {state}, log={self.log_file})"

    def openai_client(self, timeout: float = 120.0) -> openai.OpenAI:
        """An ``openai.OpenAI`` client bound to this server (no retries: failures are loud)."""
        from .client import openai_client

        return openai_client(self.base_url, api_key=self.api_key, timeout=timeout)
