"""The kit's one launcher: every process it starts goes through this module.

* ports: vllm serve's default, and a port held until the server binds it (after sglang's ``reserve_port``);
* process groups: every server, router, Ray driver and benchmark engine runs in its own process group,
  so one signal reaches the front end, the engine core and the workers. The group's leader is a small
  watchdog (this module run as ``python -m tinyllm_vllm.runtime.procs PARENT_PID -- CMD...``): it starts
  CMD, polls whether the process that started it is still alive, and stops the whole group when it is not
  (a killed or restarted Jupyter kernel). The watchdog is single-threaded, so the parent-death signal it
  gives CMD is safe there; the starting process (a Jupyter kernel runs threads) never runs code between
  fork and exec;
* short commands (``run``: nvidia-smi, py-spy, a check in a fresh interpreter) and a reader of one
  command's output lines (``stream``);
* ``ManagedProcess``: the handle on a started service (its log file, its port held until it listens,
  readiness on a health URL, stop, cleanup at interpreter exit), the base of the vLLM server, the router
  and Ray Serve, modelled on vLLM's ``RemoteOpenAIServer`` and sglang's ``launch_server_cmd`` /
  ``wait_for_server`` / ``terminate_process``.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

from tinyllm_vllm.errors import ServerError

POLL_S = 0.2
DEFAULT_PORT = 8000  # vllm serve's
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def local_host(host: str) -> str:
    """Where this machine reaches a service bound to ``host`` (a wildcard bind is reached on 127.0.0.1)."""
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


# --- ports ---------------------------------------------------------------------------------------------------


def hold_port(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A socket bound to ``port`` (0: one the OS picks) with SO_REUSEPORT, held until the server listens.

    vLLM's server binds its own socket with SO_REUSEADDR and SO_REUSEPORT, so it can bind the held port
    while nothing else can: no other program takes the port between choosing it and the server's start."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((local_host(host), port))
    except OSError:
        s.close()
        raise
    return s


def serve_port(host: str, asked: int | None) -> int | None:
    """The port a server is started on: the one asked for (0: any), else vllm serve's 8000 when it is free, else
    None (``ManagedProcess.choose_port`` then holds one the OS picks)."""
    if asked is not None:
        return asked or None
    return DEFAULT_PORT if port_is_free(host, DEFAULT_PORT) else None


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((local_host(host), port))
        except OSError:
            return False
    return True


# --- commands and process groups -----------------------------------------------------------------------------


def run(
    cmd: Sequence[str], timeout: float | None = None, env: dict[str, str] | None = None, capture: bool = True, **kw: Any
) -> subprocess.CompletedProcess:
    """A short command run to its end (text; its output captured unless ``capture`` is false)."""
    return subprocess.run(list(cmd), capture_output=capture, text=True, timeout=timeout, env=env, **kw)


@functools.cache
def gpus() -> tuple[dict[str, Any], ...]:
    """The machine's NVIDIA GPUs as nvidia-smi lists them ({name, memory_gib, persistence_mode}), read once a
    process (the plan, the memory shares, the device check and a benchmark's machine record all ask)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ()
    query = "--query-gpu=name,memory.total,persistence_mode"
    try:
        out = run([smi, query, "--format=csv,noheader,nounits"], timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    found = []
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        try:
            memory = float(fields[1]) / 1024 if len(fields) > 1 else None
        except ValueError:
            memory = None
        if fields[0]:
            found.append({"name": fields[0], "memory_gib": memory, "persistence_mode": (fields[2:] or [None])[0]})
    return tuple(found)


def stream(cmd: Sequence[str]) -> subprocess.Popen:
    """A command whose output lines the caller reads as they come (``proc.stdout``); stop it with ``stop``."""
    return subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def stop(proc: subprocess.Popen, grace: float = 5.0) -> int | None:
    """Terminate one process (not a group), kill it after ``grace`` seconds, reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def start_group(
    cmd: Sequence[str], log_file: Path, env: dict[str, str] | None = None, pipes: bool = False, nice: int = 0
) -> subprocess.Popen:
    """Start ``cmd`` in a new process group led by the watchdog, stderr (and stdout) appended to ``log_file``.

    With ``pipes`` the command's stdin and stdout are pipes to the caller (text), for a process that is
    driven line by line (a benchmark engine waiting for its cue, then printing its result). With ``nice``
    the command runs at that niceness (coreutils' ``nice``), so it yields the CPU to others starting with it."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    with open(log_file, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        return subprocess.Popen(
            [sys.executable, "-m", "tinyllm_vllm.runtime.procs", str(os.getpid()), "--", *cmd],
            stdout=subprocess.PIPE if pipes else log,
            stderr=log if pipes else subprocess.STDOUT,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            text=pipes,
        )


def run_group(cmd: Sequence[str], log_file: Path, timeout: float, env: dict[str, str] | None = None) -> int | None:
    """Run ``cmd`` under the watchdog to its end; on a timeout or any error (Ctrl-C included) stop its whole
    group. Returns the exit code, or None when it ran out of time."""
    proc = start_group(cmd, log_file, env)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc, grace=5)
        return None
    except BaseException:
        stop_group(proc, grace=2)
        raise


def _processes() -> Iterator[tuple[int, list[str]]]:
    """The machine's live processes (not zombies, not this one) with the fields of ``/proc/PID/stat`` after
    the command name: the one reader of ``/proc``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(stat.parent.name)
        if fields[0] != "Z" and pid != os.getpid():
            yield pid, fields


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    return [pid for pid, fields in _processes() if int(fields[2]) == pgid]


def marked(mark: str, token: str) -> list[int]:
    """Live processes whose environment carries ``mark=token`` (what a launcher outside the kit's groups,
    such as Ray, started for one app)."""
    needle = f"{mark}={token}".encode()
    pids = []
    for pid, _ in _processes():
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                pids.append(pid)
        except OSError:
            continue
    return pids


def sweep(mark: str, token: str, wait: float = 10.0) -> list[int]:
    """SIGKILL every process left with ``mark=token`` and wait (up to ``wait`` s) until they are gone;
    returns what was still there."""
    left = marked(mark, token)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while left and marked(mark, token) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def renice_group(pgid: int, nice: int = 0) -> bool:
    """Set every thread of every process of a group to ``nice`` (Linux keeps a niceness per thread). Lowering
    it needs root (CAP_SYS_NICE); returns False where it was refused."""
    for pid in group_members(pgid):
        for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
            try:
                os.setpriority(os.PRIO_PROCESS, int(task.name), nice)
            except ProcessLookupError:
                continue
            except PermissionError:
                return False
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop_group(proc: subprocess.Popen, grace: float) -> int | None:
    """SIGTERM the group led by ``proc``, SIGKILL what is left after ``grace`` seconds; wait until it is empty."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        _signal_group(proc.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader: a zombie would keep the group id alive
            if not group_members(proc.pid):
                return proc.returncode
            time.sleep(0.05)
    proc.poll()
    return proc.returncode


def wait_group_gone(pgid: int, timeout: float = 30) -> bool:
    """True once no live process of the group is left (within ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return True
        time.sleep(POLL_S)
    return False


# --- the watchdog ----------------------------------------------------------------------------------


def _set_parent_death_signal() -> None:
    # Runs in the command's process between fork and exec. Safe: the watchdog has no other thread.
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def watch(parent: int, cmd: list[str]) -> int:
    """Run ``cmd``; stop the whole group if ``parent`` dies. Returns the command's exit status."""
    terminating = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal terminating  # the group gets the same signal: wait for the command to finish
        terminating = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    child = subprocess.Popen(cmd, preexec_fn=_set_parent_death_signal)
    while True:
        code = child.poll()
        if code is not None:
            return code
        if os.getppid() != parent and not terminating:
            # the process that started us is gone: nobody will call stop(), so stop the group here
            print(f"tinyllm_vllm: process {parent} that started this server exited; stopping it", flush=True)
            terminating = True
            _signal_group(os.getpgrp(), signal.SIGTERM)
            try:
                return child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(os.getpgrp(), signal.SIGKILL)
        time.sleep(POLL_S)


# --- what a child process is told ---------------------------------------------------------------------------


class ChildSpec:
    """The one form in which the kit tells a child process what to do: a dataclass written as JSON (on stdin or
    as a file) and read back as the same typed object (``EngineSpec`` of a benchmark engine, ``WorkerSpec``
    of a batch engine). Paths travel as strings (nested ones too), tuples as lists (read back as tuples)."""

    def to_json(self) -> str:
        import dataclasses
        import json

        return json.dumps(dataclasses.asdict(self), default=_path_as_text)

    @classmethod
    def from_json(cls, text: str) -> Self:
        import dataclasses
        import json

        d = json.loads(text)
        for f in dataclasses.fields(cls):
            if "tuple" in str(f.type) and isinstance(d.get(f.name), list):
                d[f.name] = tuple(d[f.name])
        return cls(**d)

    def write(self, path: Path) -> Path:
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, path: Path) -> Self:
        return cls.from_json(Path(path).read_text())


def _path_as_text(obj: Any) -> str:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} cannot travel to a child process as JSON")


# --- the handle on a started service -------------------------------------------------------------------


class ManagedProcess:
    """A process group started by the kit: log file, readiness on an HTTP health URL, stop, cleanup at exit."""

    kind = "process"
    shares_held_port = True  # binds its port with SO_REUSEPORT, so the port can stay held until it listens

    def __init__(self, log_file: Path | None, startup_timeout: float, echo: Callable[[str], Any] | None) -> None:
        self.log_file = log_file
        self.startup_timeout = startup_timeout
        self.echo = echo
        self.proc: subprocess.Popen | None = None
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._held: socket.socket | None = None  # the port, held until the process listens on it
        self.nice = 0  # the niceness it starts with (a replica that must not slow the first one's start)
        self._finalizer: weakref.finalize | None = None

    def _launch(self, cmd: list[str], env: dict[str, str], wait: bool = True, announce: str | None = None) -> None:
        """Start ``cmd`` (which names ``self.port``), echo ``announce``, and with ``wait`` wait until it is ready.
        A taken port is refused before anything starts; on any failure, Ctrl-C included (within about two
        seconds), the process group is stopped again."""
        if not self.shares_held_port:
            self.release_port()  # it binds without SO_REUSEPORT: free the port just before it starts
        if self._held is None and not port_is_free(self.host, self.port):
            raise ServerError(
                f"{self.kind} failed: port {self.port} on {self.host} is already in use: "
                f"pick another port, or stop what listens there"
            )
        self.proc = start_group(cmd, self.log_file, env, nice=self.nice)
        self._finalizer = weakref.finalize(self, stop_group, self.proc, 10.0)
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

    def choose_port(self) -> int:
        """The port: the one asked for, or one the OS picks, held until the process listens on it."""
        if not self.port:
            self._held = hold_port(self.host)
            self.port = self._held.getsockname()[1]
        return self.port

    def release_port(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    @property
    def url(self) -> str:
        """Where a client on this machine reaches the process (a wildcard bind is reached on 127.0.0.1)."""
        return f"http://{local_host(self.host)}:{self.port}"

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

    def is_ready(self) -> bool:
        """One look: whether the health URL answers 200 now; ServerError if the process has exited."""
        import httpx

        code = self.proc.poll()
        if code is not None:
            raise self.failure(f"exited with code {code} during start-up")
        try:
            if httpx.get(self.health_url(), timeout=2).status_code == 200:
                self.release_port()  # it listens: the port needs holding no longer
                return True
        except httpx.HTTPError:
            pass
        return False

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll the health URL until it answers 200; raise ServerError if the process exits or time runs out."""
        limit = timeout or self.startup_timeout
        deadline = time.monotonic() + limit
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise self.failure(f"not ready after {limit:.0f} s")
            time.sleep(0.25)

    def failure(self, what: str) -> ServerError:
        """An error whose first line names the cause found in the log, then the log's tail."""
        from tinyllm_vllm.runtime import logs

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
        return stop_group(self.proc, grace)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        from tinyllm_vllm.runtime import logs

        return logs.tail(self.log_file, lines)


def main(argv: list[str]) -> None:
    parent, sep, *cmd = argv
    if sep != "--" or not cmd:
        sys.exit("usage: python -m tinyllm_vllm.runtime.procs PARENT_PID -- CMD [ARGS...]")
    code = watch(int(parent), cmd)
    if code < 0:  # mirror a death by signal, so the starter sees e.g. -9 for a killed server
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
