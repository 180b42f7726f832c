"""Reliability and security against the real server (the same checks ``make reliability`` summarises)."""

import pytest

from tinyllm_vllm.testing import faults, reliability

pytestmark = [pytest.mark.vllm, pytest.mark.reliability]


def test_load_loses_nothing(demo_server):
    r = reliability.load(demo_server, n=500, concurrency=64)  # what the README says
    assert r["lost"] == 0 and r["answered"] == r["sent"] == 500, r
    assert r["healthy_after"]


def test_bad_requests_get_a_4xx_with_a_message(demo_server):
    r = reliability.bad_requests(demo_server)
    bad = [x for x in r["results"] if not (400 <= x["status"] < 500 and x["message"])]
    assert not bad, bad
    assert r["tried"] == 26 and r["answered_5xx"] == 0 and r["server_up"]


def test_api_key_guards_v1_but_not_health(demo_dir, cpu_settings):
    r = reliability.auth(demo_dir, cpu_settings)
    assert (r["models_no_key"], r["models_wrong_key"], r["completion_no_key"]) == (401, 401, 401)
    assert (r["models_right_key"], r["health_no_key"], r["bound_to"]) == (200, 200, "127.0.0.1")


FAULTS = {
    "port already taken": lambda d, s, w: faults.port_taken(d, s),
    "not a prepared checkpoint": lambda d, s, w: faults.not_a_checkpoint(w, s),
    "engine killed while serving": lambda d, s, w: faults.engine_killed(d, s),
    "server killed during start": lambda d, s, w: faults.killed_during_start(d, s),
    "kernel interrupted, then restarted": lambda d, s, w: faults.kernel_interrupted_and_restarted(d, s),
}


@pytest.mark.parametrize("name", FAULTS)
def test_fault_is_reported_and_leaves_nothing(name, demo_dir, cpu_settings, tmp_path):
    r = faults.fault(name, lambda: FAULTS[name](demo_dir, cpu_settings, tmp_path))
    assert r["reported"], r
    assert r["processes_left"] == 0, r
