"""Configs and checkpoints vLLM cannot run fail with one clear error naming the field or tensor."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

LOAD = """
import sys
from vllm import LLM
LLM(sys.argv[1], dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=128,
    kv_cache_memory_bytes=1 << 28, model_impl="vllm")
"""


def load_in_vllm(model: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD, str(model)], capture_output=True, text=True, timeout=300)


def write_model(path: Path, hidden: int, heads: int, drop: str | None = None) -> Path:
    """A tiny unprepared TinyLLM (config.json + safetensors) straight for vLLM, bypassing prepare's checks."""
    import torch
    from safetensors.torch import save_file

    from tinyllm_vllm.model.checkpoint import expected_shapes
    from tinyllm_vllm.model.config import TinyllmConfig

    cfg = {
        "architectures": ["TinyllmForCausalLM"],
        "model_type": "tinyllm",
        "hidden_size": hidden,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": 512,
        "max_position_embeddings": 128,
    }
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    shapes = expected_shapes(TinyllmConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    save_file({k: torch.zeros(s) for k, s in shapes.items() if k != drop}, str(path / "model.safetensors"))
    return path


def test_head_size_missing_from_cpu_attention(tmp_path):
    r = load_in_vllm(write_model(tmp_path / "m", hidden=96, heads=2))
    assert r.returncode != 0
    assert (
        "head size hidden_size/num_attention_heads = 96/2 = 48 is not supported by vLLM's CPU attention"
        in r.stdout + r.stderr
    )


def test_weight_file_missing_a_tensor(tmp_path):
    r = load_in_vllm(write_model(tmp_path / "m", hidden=128, heads=2, drop="model.layers.0.self_attn.k_proj.weight"))
    assert r.returncode != 0
    assert "checkpoint is missing tensor(s): model.layers.0.self_attn.k_proj.weight" in r.stdout + r.stderr


def test_unsupported_hidden_act(tmp_path):
    m = write_model(tmp_path / "m", hidden=128, heads=2)
    cfg = json.loads((m / "config.json").read_text()) | {"hidden_act": "gelu"}
    (m / "config.json").write_text(json.dumps(cfg))
    r = load_in_vllm(m)
    assert r.returncode != 0
    assert "config.json field 'hidden_act' is 'gelu'; TinyLLM only supports 'silu'" in r.stdout + r.stderr
