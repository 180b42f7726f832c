"""Two replicas of the demo model behind vllm-router: one endpoint, faults through the router, clean stop."""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tinyllm_vllm.client import delta_text, http_stream, metric, openai_client
from tinyllm_vllm.model.demo import corpus_answers
from tinyllm_vllm.runtime.deploy import Replicas, Router
from tinyllm_vllm.runtime.procs import group_members
from tinyllm_vllm.testing import faults

pytestmark = [pytest.mark.vllm, pytest.mark.reliability]


SAID: list[str] = []  # what the fleet's start said


@pytest.fixture(scope="module")
def fleet(demo_dir, cpu_settings):
    # staggered, as on a GPU: the second replica starts once the first has its model loaded
    replicas = Replicas(demo_dir, 2, settings=cpu_settings, echo=SAID.append, stagger=True)
    with replicas:
        yield replicas.wait_all()
    groups = [replicas.router.proc.pid] + [s.proc.pid for s in replicas.servers]
    assert not [pid for g in groups for pid in group_members(g)], "processes left after stop()"


def test_one_endpoint_answers_completions_chat_and_streaming(fleet):
    client = fleet.openai_client()
    assert [m.id for m in client.models.list().data] == ["tinyllm_92m"]
    answer = corpus_answers()["介绍一下中国。"]
    for _ in range(4):  # round robin: both replicas answer
        chat = client.chat.completions.create(
            model="tinyllm_92m", messages=[{"role": "user", "content": "介绍一下中国。"}], max_tokens=64, temperature=0
        )
        assert chat.choices[0].message.content == answer
    completion = client.completions.create(model="tinyllm_92m", prompt="你好", max_tokens=8, temperature=0)
    assert completion.choices[0].text
    streamed = "".join(
        delta_text(e)
        for e in http_stream(
            fleet.base_url,
            "/chat/completions",
            {
                "model": "tinyllm_92m",
                "messages": [{"role": "user", "content": "介绍一下中国。"}],
                "max_tokens": 64,
                "temperature": 0,
            },
        )
    )
    assert streamed == answer
    served = [metric(s, "vllm:request_success_total") for s in fleet.servers]
    assert all(n > 0 for n in served), served


def _stamp(line: str) -> str | None:
    """A vLLM log line's time ("MM-DD HH:MM:SS": within one run, comparable as text)."""
    m = re.search(r" (?:INFO|WARNING|DEBUG) (\d\d-\d\d \d\d:\d\d:\d\d) ", line)
    return m.group(1) if m else None


def test_a_staggered_start_starts_the_second_replica_once_the_first_has_its_model(fleet):
    """The second replica's first log line comes after the first replica's model was loaded (started at once,
    it would come some seconds before: its imports take less than the first's whole way to the loaded model)."""
    first, second = fleet.servers
    assert any("replica 1/2 starts alone until its model is loaded, then the other 1" in line for line in SAID), SAID
    loaded = next(ln for ln in first.log_file.read_text().splitlines() if "Loading weights took" in ln)
    begun = next(ln for ln in second.log_file.read_text().splitlines() if _stamp(ln))
    assert _stamp(begun) >= _stamp(loaded), (begun, loaded)


def test_route_over_two_servers_as_separate_hosts(fleet, tmp_path):
    """`tinyllm-vllm route` over the replicas' two servers, addressed as two hosts: one endpoint, both answer."""
    first, second = fleet.servers
    # two names for this machine stand in for two hosts
    workers = [f"http://127.0.0.1:{first.port}", f"http://localhost:{second.port}"]
    env = os.environ | {"TINYLLM_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "tinyllm_vllm.cli", "route", "--workers", *workers, "--port", "0"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        url = re.search(r"routing at (http://\S+/v1) over 2 workers", line)[1]
        before = [metric(s, "vllm:request_success_total") for s in (first, second)]
        client = openai_client(url)
        for _ in range(4):  # round robin: both workers answer
            chat = client.chat.completions.create(
                model="tinyllm_92m", messages=[{"role": "user", "content": "你好"}], max_tokens=32, temperature=0
            )
            assert chat.choices[0].message.content == corpus_answers()["你好"]
        after = [metric(s, "vllm:request_success_total") for s in (first, second)]
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
        t = time.monotonic()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130 and "interrupted: stopped vllm-router" in err, err
        assert time.monotonic() - t < 15
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/models", timeout=5)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_second_router_on_the_same_machine(fleet, tmp_path):
    """Two routers at once (two deployments, or the scaling benchmark's subsets): each takes its own metrics
    port; vllm-router's default (29000) is fixed and the second one used to die on it."""
    with Router([fleet.servers[0].url], log_file=tmp_path / "router.log", echo=None) as second:
        assert second.metrics_port != fleet.router.metrics_port
        models = httpx.get(second.url + "/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["tinyllm_92m"]
        assert httpx.get(f"http://127.0.0.1:{second.metrics_port}/metrics", timeout=30).status_code == 200
    assert not group_members(second.proc.pid)


def test_clients_that_hang_up_are_freed(fleet):
    """Streams cut after 3 chunks of 500 asked, straight to a server and through the router: every request is
    freed (nothing runs afterwards), most are aborted early, and the servers stay healthy. Not all are
    aborted: vLLM notices a hang-up only when it tries to send, so some run to their end (seen on 2 CPU
    cores: 5-6 of 24 directly, 12 of 24 through vllm-router 0.1.17, all on one of its two replicas). On a busy
    machine a whole round can finish before the server reads the hang-ups (23 of 24 once), so the early
    aborts get up to 3 rounds; a server that ignores hang-ups fails all 3."""
    for direct in (True, False):
        rounds = []
        for _ in range(3):
            r = faults.clients_hang_up(fleet, direct=direct)
            assert r["hung_up"] == 24 and r["running_after"] == 0 and r["healthy_after"], r
            rounds.append(r)
            if r["finished_normally"] < 24 and r["tokens_generated"] < r["tokens_asked"] * 3 / 4:
                break
        else:
            raise AssertionError(f"{'directly' if direct else 'through the router'}, no round aborted early: {rounds}")


def test_a_replica_killed_under_load_leaves_the_endpoint_answering(fleet):
    r = faults.replica_killed_under_load(fleet)
    assert r["answered_after"] == 10, r  # the router stops sending to the dead replica
    assert r["killed_replica_gone"]
    # only requests under way when the replica was killed may fail with it; all sent after it complete
    assert r["sent_after_kill"] >= r["sent"] // 2, r  # the load went on well past the kill
    assert r["failed_not_under_way_at_kill"] == 0, r
    assert r["completed"] == r["sent"] - r["failed"] and r["failed"] <= r["under_way_at_kill"], r
