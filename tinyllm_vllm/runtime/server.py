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
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyllm_vllm.errors import ServerError
from tinyllm_vllm.runtime import logs, startup
from tinyllm_vllm.runtime.procs import ManagedProcess
from tinyllm_vllm.settings import Settings

if TYPE_CHECKING:
    import openai


def vllm_command(*args: str) -> list[str]:
    """The ``vllm`` command line run by this Python, on the CUDA and the CPU build alike (``vllm_cli``)."""
    return [sys.executable, "-m", "tinyllm_vllm.runtime.vllm_cli", *args]


def parse_serve_args(args: Sequence[str]) -> argparse.Namespace:
    """``vllm serve`` arguments read back with vLLM's own parser (as vLLM's ``RemoteOpenAIServer`` does):
    later flags win, and an unknown or malformed flag is refused here, before anything starts."""
    import contextlib
    import io

    from tinyllm_vllm.runtime import vllm_cli  # noqa: F401  (vLLM's version lookup on the CPU build)

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
                self._args = argparse.Namespace(
                    served_model_name=[self.settings.served_name],
                    max_model_len=self.settings.max_model_len,
                    port=self.port or 0,
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
        """The ``vllm serve`` arguments the server is started with (``--port 0`` until a port is chosen)."""
        cmd = [
            "serve",
            str(self.model),
            "--served-model-name",
            self.settings.served_name,
            "--host",
            self.host,
            "--port",
            str(self.port or 0),
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
        self._args = None
        if self.args.port != (self.port or 0):  # a --port in vllm_args wins, as on vLLM's command line
            self.release_port()
            self.port = self.args.port
        self.choose_port()
        cmd = vllm_command(*self.command())
        if self.log_file is None:
            self.log_file = logs.new_log_file(self.settings.logs, f"vllm-server-{self.port}")
        # the server logs to its own file: never to a log file an in-process engine set up for itself
        env = logs.own_logging_env() | startup.cache_env(self.settings.home)
        # vLLM picks how its helper processes start (fork where it is safe, which skips a second import
        # of torch and vLLM per process): no start method is forced here
        env |= {"PYTHONUNBUFFERED": "1"} | self.env
        t0 = time.monotonic()
        took = startup.expected(self.settings.home, self.what.split()[0])
        announce = f"starting {self.kind} for {self.served_model_name} at {self.url} (log: {self.log_file}"
        announce += f"; {took})" if took else ")"
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
        from tinyllm_vllm.client import openai_client

        return openai_client(self.base_url, api_key=self.api_key, timeout=timeout)
