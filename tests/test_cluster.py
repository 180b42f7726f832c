"""Ray Serve LLM: the app's config from the kit's settings, `serve --ray` on a machine without it, the sweep.

Ray Serve LLM 2.58 imports only next to the CUDA build of vLLM 0.26; here (the CPU build) the config is
made and checked, and the command says what it needs; Ray's core runs here, so a cluster of two nodes on this
machine (``LocalCluster``) is started for real. The GPU run is ``tinyllm-vllm bench ray``.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyllm_vllm.errors import ServerError
from tinyllm_vllm.model.plugin import OWN_DP_PORT
from tinyllm_vllm.runtime.cluster import MARK, serve_config
from tinyllm_vllm.runtime.plan import plan, share
from tinyllm_vllm.runtime.procs import marked as marked_with
from tinyllm_vllm.runtime.procs import sweep as sweep_with
from tinyllm_vllm.settings import Settings

from helpers import ray_python


def _llm(config: dict) -> dict:
    (app,) = config["applications"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app" and app["route_prefix"] == "/"
    (llm,) = app["args"]["llm_configs"]
    return llm


def test_four_replicas_share_one_gpu(demo_dir, tmp_path):
    gpu = Settings(device="cuda", home=tmp_path, gpu_util=0.8)
    config = serve_config(demo_dir, gpu, 4)
    llm = _llm(config)
    assert llm["deployment_config"] == {"num_replicas": 4}
    ingress = config["applications"][0]["args"]["ingress_deployment_config"]
    assert ingress == {"num_replicas": plan(gpu, 4).api_server_count}  # HTTP replicas as the plan's API servers
    assert llm["placement_group_config"] == {"bundles": [{"CPU": 1, "GPU": 0.25}]}
    # vLLM's Ray worker asks for VLLM_RAY_PER_WORKER_GPUS of a GPU: it must fit the bundle
    env = llm["runtime_env"]["env_vars"]
    assert env["VLLM_RAY_PER_WORKER_GPUS"] == "0.25" and env["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm-cache")
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "vllm-cache" / "triton")  # not ~/.triton: the home has it all
    assert env[OWN_DP_PORT] == "1"  # each replica's engine takes its own port (next test)
    expected = share(gpu, 4).engine_options()
    assert {k: v for k, v in llm["engine_kwargs"].items() if k != "chat_template"} == expected
    assert llm["engine_kwargs"]["gpu_memory_utilization"] == pytest.approx(0.2)
    assert llm["engine_kwargs"]["chat_template"] == str(demo_dir / "chat_template.jinja")
    assert llm["model_loading_config"] == {"model_id": "tinyllm_92m", "model_source": str(demo_dir.resolve())}


def test_ray_throughput_mode(demo_dir, tmp_path, monkeypatch):
    """``serve --ray --ray-throughput``: Ray's high-throughput settings; HAProxy and direct streaming only where the
    haproxy binary is found (the LLM replicas are then the ingress, and Ray refuses an ingress config)."""
    from tinyllm_vllm.runtime.cluster import INGRESS_PER_ENGINE, throughput_env

    gpu = Settings(device="cuda", home=tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no haproxy
    config = serve_config(demo_dir, gpu, 4, throughput=True)
    args = config["applications"][0]["args"]
    assert args["ingress_deployment_config"] == {"num_replicas": INGRESS_PER_ENGINE * 4}
    assert _llm(config)["runtime_env"]["env_vars"]["VLLM_USE_RAY_V2_EXECUTOR_BACKEND"] == "1"
    assert throughput_env() == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "VLLM_USE_RAY_V2_EXECUTOR_BACKEND": "1"}
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "haproxy").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "haproxy").chmod(0o755)
    assert throughput_env()["RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING"] == "1"
    assert throughput_env()["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert "ingress_deployment_config" not in serve_config(demo_dir, gpu, 4, throughput=True)["applications"][0]["args"]
    assert "VLLM_USE_RAY_V2_EXECUTOR_BACKEND" not in _llm(serve_config(demo_dir, gpu, 4))["runtime_env"]["env_vars"]


def _dp_master_port(**env: str) -> int:
    """The data-parallel master port vLLM's config takes in a fresh process that loaded its plugins."""
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins(); "
        "from vllm.config import ParallelConfig; print(ParallelConfig().data_parallel_master_port)"
    )
    clean = {k: v for k, v in os.environ.items() if k not in (OWN_DP_PORT, "VLLM_DP_MASTER_PORT")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean | env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


@pytest.mark.slow
def test_replica_engines_take_ports_of_their_own(monkeypatch):
    # vLLM's Ray executor searches its torch.distributed port from this port + 100: engines sharing the
    # default (0) and starting together collide; the kit's replicas each take a free one
    first, second = _dp_master_port(**{OWN_DP_PORT: "1"}), _dp_master_port(**{OWN_DP_PORT: "1"})
    assert first > 1024 and second > 1024 and first != second
    from tinyllm_vllm.model.plugin import own_dp_master_port

    monkeypatch.setenv("VLLM_DP_MASTER_PORT", "23456")
    own_dp_master_port()
    assert os.environ["VLLM_DP_MASTER_PORT"] == "23456"  # a port the user set stays


def test_autoscaling_bounds_and_a_bad_pair(demo_dir, tmp_path):
    gpu = Settings(device="cuda", home=tmp_path)
    llm = _llm(serve_config(demo_dir, gpu, "auto", autoscale=(1, 4)))
    assert llm["deployment_config"] == {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}
    assert llm["placement_group_config"]["bundles"][0]["GPU"] == 0.25  # sized for the most replicas
    with pytest.raises(ServerError, match=r"--autoscale 3 2: expected 1 <= MIN <= MAX"):
        serve_config(demo_dir, gpu, "auto", autoscale=(3, 2))


def test_print_config_and_ray_without_ray(tmp_path, monkeypatch):
    env = os.environ | {"TINYLLM_HOME": str(tmp_path), "TINYLLM_MODEL": "demo"}
    cli = [sys.executable, "-m", "tinyllm_vllm.cli", "serve"]
    r = subprocess.run([*cli, "--print-config", "--replicas", "2"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    llm = _llm(json.loads(r.stdout))
    assert llm["deployment_config"] == {"num_replicas": 2} and llm["engine_kwargs"]["dtype"] == "float32"
    # the errors, from the command's own entry point in this process (no interpreter to start again)
    from tinyllm_vllm.cli import main

    monkeypatch.setenv("TINYLLM_HOME", str(tmp_path))
    monkeypatch.setenv("TINYLLM_MODEL", "demo")
    with pytest.raises(SystemExit) as e:
        main(["serve", "--ray"])
    assert str(e.value.code).startswith("error: --ray needs Ray Serve LLM and the CUDA build of vLLM 0.26")
    assert "--print-config shows the app's config" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        main(["serve", "--ray", "--max-num-seqs", "8"])
    assert str(e.value.code).startswith("error: --ray: --max-num-seqs 8: vLLM flags are not passed")


def test_sweep_stops_every_marked_process():
    # what Ray starts for an app inherits the mark, also processes in sessions of their own
    token = f"test-{os.getpid()}"
    env = os.environ | {MARK: token}
    procs = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env, start_new_session=True)
        for _ in range(2)
    ]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(marked_with(MARK, token)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(marked_with(MARK, token)) == sorted(p.pid for p in procs)
        assert sorted(sweep_with(MARK, token)) == sorted(p.pid for p in procs)
        assert all(p.wait(timeout=10) == -9 for p in procs)
        assert marked_with(MARK, token) == [] and other.poll() is None
    finally:
        for p in (*procs, other):
            p.kill()
            p.wait()


def test_batch_on_ray_data_config_and_prompts(demo_dir, tmp_path, monkeypatch):
    """``generate --input --ray``: the processor's config as a user prints it, and the prompts it sends, which vLLM
    must turn into the local batch's very tokens (vLLM adds the tokenizer's [gMASK]sop prefix itself)."""
    from transformers import AutoTokenizer

    from tinyllm_vllm.batch import BatchJob, prompt_ids, read_rows
    from tinyllm_vllm.ray_batch import prompt_texts, ray_rows

    rows_file = tmp_path / "rows.jsonl"
    rows = [
        {"id": "a", "prompt": "中国的首都是哪里？", "max_tokens": 7},
        {"messages": [{"role": "system", "content": "简短"}, {"role": "user", "content": "\n你好"}]},
        {"custom_id": "c", "body": {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}},
    ]
    rows_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    env = os.environ | {"TINYLLM_HOME": str(tmp_path / "home")}
    cli = [sys.executable, "-m", "tinyllm_vllm.cli", "generate", "--model", str(demo_dir), "--input", str(rows_file)]
    r = subprocess.run([*cli, "--print-config", "--engines", "2"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    assert config["concurrency"] == 2 and config["model_source"] == str(demo_dir.resolve())
    assert config["engine_kwargs"]["kv_cache_memory_bytes"] == 2**29  # half of the 1 GiB budget each
    assert config["runtime_env"]["env_vars"][OWN_DP_PORT] == "1"
    assert not config["chat_template_stage"] and not config["tokenize_stage"]

    tok = AutoTokenizer.from_pretrained(str(demo_dir))
    read = read_rows(rows_file)
    for raw in (False, True):
        if raw:
            read = [{"prompt": "你好"}, {"prompt": "\n北京"}]
        sent = tok(prompt_texts(tok, read, raw))["input_ids"]  # as vLLM tokenizes a text prompt
        assert sent == prompt_ids(tok, read, raw)
    job = BatchJob(rows_file, tmp_path / "out.jsonl", max_tokens=32)
    items = ray_rows(tok, job, read_rows(rows_file), [0, 2])
    assert [x["index"] for x in items] == [0, 2]
    want = {"max_tokens": 7, "temperature": 0.0, "top_p": 1.0, "skip_special_tokens": True}  # no seed: None
    assert items[0]["sampling_params"] == want
    assert items[1]["sampling_params"]["temperature"] == 0.5 and items[1]["sampling_params"]["max_tokens"] == 32

    from tinyllm_vllm.cli import main

    monkeypatch.setenv("TINYLLM_HOME", str(tmp_path / "home"))
    out = str(tmp_path / "o.jsonl")
    with pytest.raises(SystemExit) as e:  # this environment goes without Ray (make install puts it in .venv-ray)
        main(["generate", "--model", str(demo_dir), "--input", str(rows_file), "--output", out, "--ray"])
    assert "--ray needs Ray Data LLM: pip install 'tinyllm-vllm[ray-data]'" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(demo_dir), "hello", "--ray"])
    assert "--ray, --ray-address and --print-config go with --input FILE" in str(e.value.code)


def test_a_local_cluster_of_two_nodes_loses_one_and_stops_clean(tmp_path):
    """``LocalCluster`` on Ray's core (CPU, from .venv-ray): two nodes join; the worker node's raylet killed, the
    cluster counts one node alive; on stop no process of either node is left, and the cluster never named itself
    this machine's current one (where ray.init() without an address looks)."""
    script = tmp_path / "two_nodes.py"
    script.write_text(LOCAL_CLUSTER_SCRIPT)
    r = subprocess.run([ray_python(), str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.splitlines()[-1])
    # (a cluster that missed one of Ray's start-up waits on a loaded machine says so and is started again)
    last_start = [i for i, line in enumerate(seen["said"]) if "starting it again" in line][-1:] or [-1]
    ups = [line.split(",")[0] for line in seen["said"][last_start[0] + 1 :] if " up (" in line]
    assert ups == ["Ray node 1/2 up (head", "Ray node 2/2 up (worker"], seen["said"]
    assert seen["alive"] == 2 and seen["marked"] == [True, True]  # each node's processes carry its own mark
    assert seen["alive_after_kill"] == 1 and seen["replicas"] == [0, 0]
    assert not any(marked_with(MARK, token) for token in seen["tokens"])
    current = Path("/tmp/ray/ray_current_cluster")
    assert not (current.exists() and current.read_text().strip() == seen["address"]), current.read_text()
    assert not Path(seen["temp_dir"]).exists()


LOCAL_CLUSTER_SCRIPT = """
import json, sys, time
from pathlib import Path
from tinyllm_vllm.runtime.cluster import MARK, LocalCluster
from tinyllm_vllm.runtime.procs import marked

said = []
cluster = LocalCluster(Path(sys.argv[1]), 2, gpus=0, echo=said.append)
seen = {"said": said}
with cluster:
    seen["alive"] = cluster.alive_nodes()
    seen["marked"] = [bool(marked(MARK, token)) for token in cluster.node_tokens]
    cluster.kill_node(1)
    deadline = time.monotonic() + 120
    while cluster.alive_nodes() > 1 and time.monotonic() < deadline:
        time.sleep(1)
    seen["alive_after_kill"] = cluster.alive_nodes()
    seen["replicas"] = cluster.replicas_per_node()
seen |= {"tokens": cluster.node_tokens, "address": cluster.address, "temp_dir": str(cluster.temp_dir)}
print(json.dumps(seen))
"""
