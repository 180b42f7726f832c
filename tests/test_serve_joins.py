"""`serve --replicas N` answers as soon as its first replica is ready; the others join the router as each becomes
ready, and a request stream across the joins loses nothing."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tinyllm_vllm.client import metric
from tinyllm_vllm.model.demo import corpus_answers
from tinyllm_vllm.runtime.procs import group_members

from helpers import kill_everything, watchdogs_of

pytestmark = pytest.mark.vllm


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _port_of(watchdog: int) -> str:
    args = _cmdline(watchdog).split()
    return args[args.index("--port") + 1]


def test_serve_answers_on_the_first_replica_and_the_second_joins(demo_dir, tmp_path):
    """One replica is held back (SIGSTOP on its process group, as a slow start would): the endpoint answers on
    the other, which a router waiting for both could not; a request stream runs while the held one is let go
    and joins; every request is answered, the joined replica serves too, and Ctrl-C leaves nothing."""
    p = subprocess.Popen(
        [sys.executable, "-m", "tinyllm_vllm.cli", "serve", "--model", str(demo_dir), "--port", "0", "--replicas", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"TINYLLM_HOME": str(tmp_path), "TINYLLM_KV_CACHE_GB": "0.5"},
        start_new_session=True,
        # the machine's cores, as a user's command has them (the suite may have kept this worker to one): the
        # command gives each replica cores of its own
        preexec_fn=lambda: os.sched_setaffinity(0, range(os.cpu_count() or 1)),
    )
    said: list[str] = []  # everything the command says on stderr
    reader = threading.Thread(target=lambda: said.extend(p.stderr), daemon=True)
    reader.start()
    groups: list[int] = []
    held: int | None = None
    stop = threading.Event()  # ends the request stream, also when an assertion fails

    def line_with(text: str) -> str | None:
        return next((ln for ln in list(said) if text in ln), None)

    try:
        deadline = time.monotonic() + 60
        while len(groups := watchdogs_of(p.pid)) < 2:  # both replicas are started at once, before the router
            assert p.poll() is None and time.monotonic() < deadline, said
            time.sleep(0.05)
        held = max(groups)  # the replica started second
        while not any(pid != held and "vllm_cli" in _cmdline(pid) for pid in group_members(held)):  # its server is up
            assert p.poll() is None and time.monotonic() < deadline, said
            time.sleep(0.02)
        os.killpg(held, signal.SIGSTOP)
        held_port = _port_of(held)

        out: list[str] = []  # the command's stdout: one line once the endpoint answers
        threading.Thread(target=lambda: out.extend(p.stdout), daemon=True).start()
        deadline = time.monotonic() + 300
        while not out:  # a router that waited for both replicas would never get here
            assert p.poll() is None and time.monotonic() < deadline, f"no answer while one replica was held: {said}"
            time.sleep(0.2)
        serving = out[0]
        assert serving.startswith("serving tinyllm_92m at http://"), (serving, said)
        base_url = serving.split(" at ", 1)[1].split(";")[0]
        groups = watchdogs_of(p.pid)  # with the router's
        ask = {"model": "tinyllm_92m", "messages": [{"role": "user", "content": "请介绍一下北京"}], "max_tokens": 64}
        r = httpx.post(base_url + "/chat/completions", json=ask, timeout=60)
        assert (
            r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == corpus_answers()["请介绍一下北京"]
        )
        ready = line_with("/2 ready (")
        assert ready and "the other 1 join as they are ready" in ready and f":{held_port})" not in ready, said
        assert line_with("joined") is None, said

        results: list[int] = []

        def stream() -> None:
            with httpx.Client(timeout=120) as client:
                while not stop.is_set():
                    try:
                        results.append(client.post(base_url + "/chat/completions", json=ask).status_code)
                    except httpx.HTTPError:
                        results.append(0)
                    time.sleep(0.1)  # a steady stream, not a load: the held replica's start needs the CPU too

        senders = [threading.Thread(target=stream, daemon=True) for _ in range(2)]
        for th in senders:
            th.start()
        deadline = time.monotonic() + 120
        while not results:  # the stream is running before the held replica goes on
            assert time.monotonic() < deadline, said
            time.sleep(0.05)
        os.killpg(held, signal.SIGCONT)
        deadline = time.monotonic() + 600  # on 2 loaded cores the held replica starts slowly while the first serves
        while not line_with("2 of 2 replicas answering"):
            assert p.poll() is None and time.monotonic() < deadline, said
            time.sleep(0.2)
        joined = line_with("joined after")
        before_join = len(results)
        while len(results) < before_join + 8:  # requests after the join, spread over both replicas
            time.sleep(0.2)
        stop.set()
        for th in senders:
            th.join()
        # every request answered, also those under way while the held replica joined the router
        assert before_join > 0 and set(results) == {200}, f"{results.count(0)} failed, codes {set(results)}"
        first_url = re.search(r"replica \d/2 ready \((http://[\d.:]+)\)", "".join(said)).group(1)
        second_url = re.search(r"joined after \d+ s \(2 of 2 answering; (http://[\d.:]+),", joined).group(1)
        assert second_url.endswith(f":{held_port}"), joined
        served = [metric(u, "vllm:request_success_total") for u in (first_url, second_url)]
        assert all(n > 0 for n in served), served  # the joined replica takes requests too

        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
        assert p.returncode == 130
        assert groups and not any(group_members(g) for g in groups)
    finally:  # whatever failed above, leave nothing running for the rest of the suite
        stop.set()
        if held:
            try:
                os.killpg(held, signal.SIGCONT)  # a stopped group must run again to die on SIGTERM
            except ProcessLookupError:
                pass
        kill_everything(p, groups)
