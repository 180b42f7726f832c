"""The one-GPU plan and the one memory-share rule, on the numbers a GPU box would report."""

import os

import pytest

from tinyllm_vllm.runtime import plan as planning
from tinyllm_vllm.settings import Settings


@pytest.fixture
def h200(monkeypatch):
    monkeypatch.setattr(planning, "gpu_memory_gib", lambda: 139.8)

    def cores(n):
        monkeypatch.setattr(planning.os, "sched_getaffinity", lambda pid: set(range(n)))

    return cores


def test_auto_fills_a_gpu_as_far_as_the_cores_allow(h200):
    settings = Settings(device="cuda")
    h200(16)
    p = planning.plan(settings)
    assert (p.engines, p.api_server_count) == (4, 2) and p.engine_options == {"distributed_executor_backend": "mp"}
    assert "16 CPU cores allow 4" in p.why
    h200(8)
    assert planning.plan(settings).engines == 2
    h200(64)  # more cores: still the measured useful count
    assert planning.plan(settings).engines == planning.USEFUL_REPLICAS_PER_GPU


def test_offline_engines_are_planned_from_the_scan(h200):
    """The batch and the benchmarks: offline engines need fewer cores each than replicas, and the scan found 8."""
    settings = Settings(device="cuda")
    h200(16)
    p = planning.plan(settings, offline=True)
    assert p.engines == 8 and "16 CPU cores allow 8" in p.why and "8 offline engines made the most" in p.why
    h200(8)
    assert planning.plan(settings, offline=True).engines == 4


def test_a_light_start_keeps_the_count_with_vllms_one_engine_layout(h200):
    h200(16)
    p = planning.plan(Settings(device="cuda"), "auto", light=True)
    assert (p.engines, p.api_server_count, p.engine_options) == (4, 1, {})
    assert "light start" in p.why
    from tinyllm_vllm.runtime.deploy import Replicas

    def flag(replicas, name):
        flags = replicas.servers[0].command()
        return flags[flags.index(name) + 1] if name in flags else None

    full, light = (Replicas("m", 4, settings=Settings(device="cuda"), light=x, echo=None) for x in (False, True))
    assert (flag(full, "--api-server-count"), flag(full, "--distributed-executor-backend")) == ("2", "mp")
    assert (flag(light, "--api-server-count"), flag(light, "--distributed-executor-backend")) == ("1", None)


def test_a_number_is_taken_as_given(h200):
    h200(16)
    assert planning.plan(Settings(device="cuda"), "2").engines == 2


def test_on_a_cpu_auto_is_one_engine():
    assert planning.plan(Settings(device="cpu")).engines == 1


def test_each_engine_gets_its_share_as_a_fixed_kv_cache(h200):
    settings = Settings(device="cuda", gpu_util=0.8)
    each = planning.share(settings, 4).engine_options()
    assert each["gpu_memory_utilization"] == pytest.approx(0.2)
    assert each["kv_cache_memory_bytes"] == int(139.8 * 0.8 / 4 / 2 * (1 << 30))
    cpu = planning.share(Settings(device="cpu", kv_cache_gb=1.0), 2).engine_options()
    assert cpu["kv_cache_memory_bytes"] == 1 << 29
    assert planning.share(settings, 1) is settings


def test_a_bad_count_is_named():
    from tinyllm_vllm.errors import SettingsError

    with pytest.raises(SettingsError, match="'lots' engines or replicas: expected a number"):
        planning.plan(Settings(device="cpu"), "lots")


def test_serve_auto_plans_once_reads_nvidia_smi_once_and_keeps_the_reason(tmp_path, monkeypatch):
    """``serve --replicas auto`` on a GPU box: the plan is decided once and handed to the replicas, which start
    with its reason (not "as asked"); nvidia-smi is read once for the plan and the memory shares together."""
    import argparse

    from tinyllm_vllm import cli

    calls = tmp_path / "calls"
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "NVIDIA H200, 143771, Enabled"\n')  # name, MiB, persistence
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(planning.os, "sched_getaffinity", lambda pid: set(range(16)))
    from tinyllm_vllm.runtime.procs import gpus

    gpus.cache_clear()
    try:
        a = argparse.Namespace(host="127.0.0.1", port=0, api_key=None, vllm_args=[])
        said = []
        monkeypatch.setattr(cli, "say", said.append)
        replicas = cli._deployment(a, Settings(device="cuda"), tmp_path, "auto")
        assert len(replicas.servers) == 4 and "16 CPU cores allow 4" in replicas.plan.why
        assert "as asked" not in replicas.plan.why
        assert any(line.startswith("plan: 4 replicas: 16 CPU cores allow 4") for line in said), said
        assert len(calls.read_text().splitlines()) == 1  # the plan and the 4 memory shares: one read
    finally:
        gpus.cache_clear()


def test_engines_on_a_cpu_get_cores_of_their_own(monkeypatch):
    """vLLM's own binding puts every engine of a 2-core machine on core 0; the kit splits the cores instead,
    and leaves one engine, a GPU and a binding the user set to vLLM."""
    from tinyllm_vllm.runtime.plan import BIND, cores_env

    cpu = Settings(device="cpu")
    monkeypatch.delenv(BIND, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert [cores_env(cpu, k, 2)[BIND] for k in range(2)] == ["0,1,2", "3,4"]
    assert [cores_env(cpu, k, 7)[BIND] for k in range(7)] == ["0", "1", "2", "3", "4", "0", "1"]
    assert cores_env(cpu, 0, 1) == {} and cores_env(Settings(device="cuda"), 1, 2) == {}
    monkeypatch.setenv(BIND, "nobind")
    assert cores_env(cpu, 1, 2) == {}
