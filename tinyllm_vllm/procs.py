"""Process groups for the servers the kit starts: start one under a watchdog, list it, stop it.

Every server (and the router) runs in its own process group, so one signal reaches the front end,
the engine core and the workers. The group's leader is a small watchdog (this module run as
``python -m tinyllm_vllm.procs PARENT_PID -- CMD...``): it starts CMD, polls whether the process
that started it is still alive, and stops the whole group when it is not (a killed or restarted
Jupyter kernel). The watchdog is single-threaded, so the parent-death signal it gives CMD is safe
there; the starting process (a Jupyter kernel runs threads) never runs code between fork and exec.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

POLL_S = 0.2


def start_group(
    cmd: Sequence[str], log_file: Path, env: dict[str, str] | None = None, pipes: bool = False
) -> subprocess.Popen:
    """Start ``cmd`` in a new process group led by the watchdog, stderr (and stdout) appended to ``log_file``.

    With ``pipes`` the command's stdin and stdout are pipes to the caller (text), for a process that is
    driven line by line (a benchmark engine waiting for its cue, then printing its result)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        return subprocess.Popen(
            [sys.executable, "-m", "tinyllm_vllm.procs", str(os.getpid()), "--", *cmd],
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


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


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


def main(argv: list[str]) -> None:
    parent, sep, *cmd = argv
    if sep != "--" or not cmd:
        sys.exit("usage: python -m tinyllm_vllm.procs PARENT_PID -- CMD [ARGS...]")
    code = watch(int(parent), cmd)
    if code < 0:  # mirror a death by signal, so the starter sees e.g. -9 for a killed server
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
