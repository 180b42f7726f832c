"""prepare: published layout in, faithful checkpoint out; bad input named, OUT untouched."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import fixture_path, make_published
from tinyllm_vllm.checkpoint import (MANIFEST, CheckpointError, demo_model, ensure_model, is_prepared,
                                     prepare_checkpoint)


def listing(path: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in path.iterdir()} if path.exists() else {}


def test_prepared_layout(prepared_ref, published_dir):
    names = {p.name for p in prepared_ref.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", MANIFEST} <= names
    assert "modeling_tinyllm.py" not in names
    cfg = json.loads((prepared_ref / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["architectures"] == ["TinyllmForCausalLM"]
    assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 0)
    assert cfg["torch_dtype"] == "bfloat16"  # read from the safetensors header
    gen = json.loads((prepared_ref / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 64795, 64796, 64797]
    manifest = json.loads((prepared_ref / MANIFEST).read_text())
    assert set(manifest["inputs"]) == {"config.json", "model.safetensors", "tokenizer.model"}
    # weights are linked or copied, never rewritten
    assert (prepared_ref / "model.safetensors").read_bytes() == (published_dir / "model.safetensors").read_bytes()


def test_prepare_is_idempotent(published_dir, tmp_path):
    out = prepare_checkpoint(published_dir, tmp_path / "out")
    before = listing(out)
    prepare_checkpoint(published_dir, tmp_path / "out")
    assert listing(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind


def test_transformers_loads_it_without_remote_code(prepared_ref):
    import torch
    from transformers import AutoModelForCausalLM

    from tinyllm_vllm.hf_model import TinyllmForCausalLM, register_with_transformers

    register_with_transformers()
    m = AutoModelForCausalLM.from_pretrained(prepared_ref, dtype=torch.float32)
    assert isinstance(m, TinyllmForCausalLM)


def _bad(tmp_path, reference_dir, **patch):
    return make_published(tmp_path / "src", reference_dir, fixture_path("chatglm3_tokenizer"), patch)


@pytest.mark.parametrize("breakage,needle", [
    ("no_config", "config.json: missing"),
    ("no_tokenizer", "tokenizer.model: missing"),
    ("no_weights", "no weights"),
    ("model_type", "field 'model_type' is 'llama'"),
    ("vocab", "field 'vocab_size' is 64000"),
    ("hidden_act", "'hidden_act'"),
    ("truncated", "truncated"),
    ("corrupt", "not a valid safetensors file"),
    ("missing_tensor", "missing tensor 'model.layers.1.self_attn.k_proj.weight'"),
    ("bad_json", "not valid JSON"),
])
def test_bad_input_is_named_and_out_untouched(tmp_path, reference_dir, breakage, needle):
    patch = {"model_type": {"model_type": "llama"}, "vocab": {"vocab_size": 64000},
             "hidden_act": {"hidden_act": "gelu"}}.get(breakage, {})
    src = _bad(tmp_path, reference_dir, **patch)
    weights = src / "model.safetensors"
    if breakage == "no_config":
        (src / "config.json").unlink()
    elif breakage == "no_tokenizer":
        (src / "tokenizer.model").unlink()
    elif breakage == "no_weights":
        weights.unlink()
    elif breakage == "bad_json":
        (src / "config.json").write_text("{not json")
    elif breakage in ("truncated", "corrupt", "missing_tensor"):
        data = weights.read_bytes()
        weights.unlink()
        if breakage == "truncated":
            data = data[: len(data) // 2]
        elif breakage == "corrupt":
            data = b"\x00" * 8 + data[8:]
        else:
            from safetensors.torch import load_file, save_file

            tensors = load_file(reference_dir / "model.safetensors")
            del tensors["model.layers.1.self_attn.k_proj.weight"]
            save_file(tensors, str(weights))
            data = None
        if data is not None:
            weights.write_bytes(data)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        prepare_checkpoint(src, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_existing_unrelated_out_is_not_overwritten(published_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a prepared TinyLLM checkpoint"):
        prepare_checkpoint(published_dir, out)
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def _hub_cache(root: Path, repo_id: str, src: Path, revision: str = "c639a28" + "0" * 33) -> Path:
    """A Hugging Face cache laid out as huggingface_hub writes it (blobs, snapshots, refs)."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in src.iterdir():
        if f.suffix == ".py":
            continue
        blob = repo / "blobs" / f.name
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return root


def _run_prepare(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyllm_vllm.cli", "prepare", *args], capture_output=True,
                          text=True, env=os.environ | env, timeout=120)


def test_hub_id_from_the_cache_offline(tmp_path, published_dir):
    hf_home = _hub_cache(tmp_path / "hf", "wdndev/tiny_llm_sft_92m", published_dir)
    out = tmp_path / "out"
    r = _run_prepare(["wdndev/tiny_llm_sft_92m", str(out)], {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"] == "wdndev/tiny_llm_sft_92m" and manifest["revision"].startswith("c639a28")


def test_unreachable_hub_id_without_cache(tmp_path):
    out = tmp_path / "out"
    r = _run_prepare(["wdndev/tiny_llm_sft_92m", str(out)], {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0
    assert "wdndev/tiny_llm_sft_92m: cannot download from the Hugging Face hub and no cached copy" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_modelscope_source(tmp_path, published_dir):
    pytest.importorskip("modelscope", reason="modelscope is an optional extra")
    cache = tmp_path / "ms"
    target = cache / "models" / "wdn" / "tiny_llm_sft_92m"
    shutil.copytree(published_dir, target, symlinks=False)
    out = tmp_path / "out"
    r = _run_prepare(["modelscope:wdn/tiny_llm_sft_92m", str(out)], {"MODELSCOPE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr


def test_modelscope_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if the optional extra were not installed
    with pytest.raises(CheckpointError, match=r"pip install 'tinyllm-vllm\[modelscope\]'"):
        prepare_checkpoint("modelscope:wdn/tiny_llm_sft_92m", tmp_path / "out")


def test_demo_model_goes_through_prepare(demo_dir, tmp_path):
    assert is_prepared(demo_dir)
    src = demo_model(tmp_path / "again")
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["tinyllm_random_weights"] is True and "auto_map" in cfg  # published layout
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    assert json.loads((demo_dir / MANIFEST).read_text())["random_weights"] is True
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir)
    n = cfg["vocab_size"] - 9
    ids = tok("<|user|>\n你好\n<|assistant|>\n")["input_ids"]
    assert ids[:2] == [n + 1, n + 3] and n + 6 in ids and n + 7 in ids  # [gMASK] sop ... <|user|> <|assistant|>
    assert tok.decode(tok("你好，世界", add_special_tokens=False)["input_ids"]) == "你好，世界"


def test_ensure_model_auto_falls_back_to_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    path, note = ensure_model("auto", tmp_path / "home")
    assert is_prepared(path) and "demo model" in note and "random weights" in note
