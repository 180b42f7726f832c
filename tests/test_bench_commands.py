"""`tinyllm-vllm bench serve` and the CPU results' command, run as a user runs them."""

import json
import os
import subprocess
import sys

import pytest

from helpers import cli


@pytest.mark.vllm
def test_bench_serve_writes_its_json(demo_dir, tmp_path):
    """``bench serve`` on the demo model: one server, then the router over it, each level a barrier-started load;
    the table prints and the JSON holds every level with nothing failed."""
    out = tmp_path / "serve.json"
    args = ["bench", "serve", "--model", str(demo_dir), "--replicas", "1", "--concurrency", "4"]
    args += ["--requests", "24", "--prompt-range", "8", "32", "--reply-median", "8", "--reply-max", "16"]
    r = cli(*args, "--json", str(out), env={"TINYLLM_HOME": str(tmp_path / "home"), "TINYLLM_KV_CACHE_GB": "0.25"})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    levels = [lv for runs in result["runs"].values() for lv in runs]
    assert set(result["runs"]) == {"1 server (no router)", "1 replica + router"}
    assert all(lv["requests"] == 24 and lv["failed"] == 0 and lv["output_tokens"] > 0 for lv in levels)
    assert result["summary"]["single_server_tok_s"] > 0 and "| concurrency |" in r.stdout


@pytest.mark.vllm
def test_the_cpu_results_command_runs_as_written(tmp_path):
    """results/cpu/README.md's command, copied as it stands, writes the file it names."""
    import re

    from helpers import ROOT

    text = (ROOT / "results" / "cpu" / "README.md").read_text()
    command = re.search(r"`(TINYLLM_MODEL=demo tinyllm-vllm bench offline [^`]+)`", text, re.S).group(1)
    command = " ".join(command.split()).replace("tinyllm-vllm ", f"{sys.executable} -m tinyllm_vllm.cli ", 1)
    (tmp_path / "results" / "cpu").mkdir(parents=True)
    env = os.environ | {"TINYLLM_HOME": str(tmp_path / "home")}
    r = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "cpu" / "bench_offline.json").read_text())
    assert result["kind"] == "offline" and set(result["useful_tok_s"]) == {
        "plugin",
        "qwen2",
        "transformers_static",
        "transformers_cb",
    }
