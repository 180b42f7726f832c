"""Configs and checkpoints vLLM cannot run fail with one clear error naming the field or tensor."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

# each model in turn in one Python process (vLLM imported once): its own section of the output
LOAD = """
import sys, traceback
from vllm import LLM
for path in sys.argv[1:]:
    print(f"=== {path}", flush=True)
    try:
        LLM(path, dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=128,
            kv_cache_memory_bytes=1 << 28, model_impl="vllm")
        print("=== loaded", flush=True)
    except Exception:
        traceback.print_exc(file=sys.stdout)
        print("=== failed", flush=True)
"""


@pytest.fixture(scope="module")
def loads(tmp_path_factory) -> dict[str, str]:
    """What loading each broken model in vLLM printed, by case; each section ends in "=== failed" (the load
    raised) or "=== loaded"."""
    base = tmp_path_factory.mktemp("broken")
    models = {
        "head size": write_model(base / "head", hidden=96, heads=2),
        "missing tensor": write_model(
            base / "tensor", hidden=128, heads=2, drop="model.layers.0.self_attn.k_proj.weight"
        ),
        "hidden act": write_model(base / "act", hidden=128, heads=2),
    }
    cfg = json.loads((models["hidden act"] / "config.json").read_text()) | {"hidden_act": "gelu"}
    (models["hidden act"] / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run(
        [sys.executable, "-c", LOAD, *map(str, models.values())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # the engine's processes log the cause; one stream keeps the sections in order
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:]
    starts = [r.stdout.index(f"=== {m}\n") for m in models.values()]
    ends = starts[1:] + [len(r.stdout)]
    return {case: r.stdout[a:b] for case, a, b in zip(models, starts, ends, strict=True)}


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


def test_head_size_missing_from_cpu_attention(loads):
    out = loads["head size"]
    assert "=== failed" in out
    assert "head size hidden_size/num_attention_heads = 96/2 = 48 is not supported by vLLM's CPU attention" in out


def test_weight_file_missing_a_tensor(loads):
    out = loads["missing tensor"]
    assert "=== failed" in out
    assert "checkpoint is missing tensor(s): model.layers.0.self_attn.k_proj.weight" in out


def test_unsupported_hidden_act(loads):
    out = loads["hidden act"]
    assert "=== failed" in out
    assert "config.json field 'hidden_act' is 'gelu'; TinyLLM only supports 'silu'" in out
