"""`serve --replicas N` answers as soon as its first replica is ready; the others join the router as each becomes
ready, and a request stream across the joins loses nothing."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tinyllm_vllm.client import metric
from tinyllm_vllm.model.demo import corpus_answers
from tinyllm_vllm.runtime.procs import group_members

from helpers import kill_everything, watchdogs_of

pytestmark = pytest.mark.vllm


def test_serve_answers_on_the_first_replica_and_the_second_joins(demo_dir, tmp_path):
    p = subprocess.Popen(
        [sys.executable, "-m", "tinyllm_vllm.cli", "serve", "--model", str(demo_dir), "--port", "0", "--replicas", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"TINYLLM_HOME": str(tmp_path), "TINYLLM_KV_CACHE_GB": "0.5"},
        start_new_session=True,
    )
    said: list[tuple[float, str]] = []  # (when, line) of everything the command says on stderr
    reader = threading.Thread(target=lambda: said.extend((time.monotonic(), ln) for ln in p.stderr), daemon=True)
    reader.start()
    groups: list[int] = []
    stop = threading.Event()  # ends the request stream, also when an assertion fails

    def line_with(text: str) -> tuple[float, str] | None:
        return next(((t, ln) for t, ln in list(said) if text in ln), None)

    try:
        serving = p.stdout.readline()  # printed once the endpoint answers
        assert serving.startswith("serving tinyllm_92m at http://"), (serving, said)
        base_url = serving.split(" at ", 1)[1].split(";")[0]
        groups = watchdogs_of(p.pid)
        ask = {"model": "tinyllm_92m", "messages": [{"role": "user", "content": "请介绍一下北京"}], "max_tokens": 64}
        r = httpx.post(base_url + "/chat/completions", json=ask, timeout=60)
        answered_at = time.monotonic()
        assert (
            r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == corpus_answers()["请介绍一下北京"]
        )
        # the endpoint was announced with the first replica ready, the other one joining (on a CPU each replica has
        # cores of its own, so the second is often ready a moment later, sometimes before the first request)
        ready_at, ready = line_with("replica 1/2 ready")
        assert "answering at" in ready and "the other 1 join as they are ready" in ready, said
        joined = line_with("replica 2/2 joined")
        assert joined is None or joined[0] >= ready_at, said

        results: list[int] = []

        def stream() -> None:
            with httpx.Client(timeout=120) as client:
                while not stop.is_set():
                    try:
                        results.append(client.post(base_url + "/chat/completions", json=ask).status_code)
                    except httpx.HTTPError:
                        results.append(0)

        senders = [threading.Thread(target=stream, daemon=True) for _ in range(2)]
        for th in senders:
            th.start()
        deadline = time.monotonic() + 600  # on 2 busy cores the second replica starts slowly under load
        while not line_with("2 of 2 replicas answering"):
            assert p.poll() is None and time.monotonic() < deadline, said
            time.sleep(0.2)
        joined_at, joined = line_with("replica 2/2 joined")
        before_join = len(results)
        while len(results) < before_join + 8:  # requests after the join, spread over both replicas
            time.sleep(0.2)
        stop.set()
        for th in senders:
            th.join()
        # every request answered, also those under way while the second replica joined the router
        assert set(results) == {200}, f"{results.count(0)} failed, codes {set(results)}"
        assert joined_at < answered_at or before_join > 0, "the stream ran before the join, yet nothing was sent"
        first_url = re.search(r"replica 1/2 ready \((http://[\d.:]+)\)", "".join(ln for _, ln in said)).group(1)
        second_url = re.search(r"joined after \d+ s \(2 of 2 answering; (http://[\d.:]+),", joined).group(1)
        served = [metric(u, "vllm:request_success_total") for u in (first_url, second_url)]
        assert all(n > 0 for n in served), served  # the joined replica takes requests too

        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
        assert p.returncode == 130
        assert groups and not any(group_members(g) for g in groups)
    finally:  # whatever failed above, leave nothing running for the rest of the suite
        stop.set()
        kill_everything(p, groups)
