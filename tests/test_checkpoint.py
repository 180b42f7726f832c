"""prepare: published layout in, faithful checkpoint out; bad input named, OUT untouched."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyllm_vllm.errors import CheckpointError
from tinyllm_vllm.model.checkpoint import MANIFEST, is_prepared, prepare_checkpoint
from tinyllm_vllm.model.demo import corpus_answers, demo_model
from tinyllm_vllm.model.sources import ensure_model, prepare

from helpers import data_path, make_published


def listing(path: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in path.iterdir()} if path.exists() else {}


def test_prepared_layout(prepared_ref, published_dir):
    names = {p.name for p in prepared_ref.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        MANIFEST,
    } <= names
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

    from tinyllm_vllm.model.hf_model import TinyllmForCausalLM, register_with_transformers

    register_with_transformers()
    m = AutoModelForCausalLM.from_pretrained(prepared_ref, dtype=torch.float32)
    assert isinstance(m, TinyllmForCausalLM)


def _bad(tmp_path, reference_dir, **patch):
    return make_published(tmp_path / "src", reference_dir, data_path("chatglm3_tokenizer"), patch)


@pytest.mark.parametrize(
    "breakage,needle",
    [
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
    ],
)
def test_bad_input_is_named_and_out_untouched(tmp_path, reference_dir, breakage, needle):
    patch = {
        "model_type": {"model_type": "llama"},
        "vocab": {"vocab_size": 64000},
        "hidden_act": {"hidden_act": "gelu"},
    }.get(breakage, {})
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
    return subprocess.run(
        [sys.executable, "-m", "tinyllm_vllm.cli", "prepare", *args],
        capture_output=True,
        text=True,
        env=os.environ | env,
        timeout=120,
    )


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
    assert "error: wdndev/tiny_llm_sft_92m: HF_HUB_OFFLINE is set, and no cached copy was found" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_modelscope_source(tmp_path, published_dir):
    pytest.importorskip("modelscope", reason="modelscope is an optional extra")
    cache = tmp_path / "ms"
    target = cache / "models" / "wdn" / "tiny_llm_sft_92m"
    shutil.copytree(published_dir, target, symlinks=False)
    out = tmp_path / "out"
    r = _run_prepare(
        ["modelscope:wdn/tiny_llm_sft_92m", str(out)], {"MODELSCOPE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)  # prepare prints where the prepared checkpoint is
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"] == "modelscope:wdn/tiny_llm_sft_92m"
    assert (out / "model.safetensors").read_bytes() == (published_dir / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text())["model_type"] == "tinyllm"


def test_modelscope_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if the optional extra were not installed
    with pytest.raises(CheckpointError, match=r"pip install 'tinyllm-vllm\[modelscope\]'"):
        prepare("modelscope:wdn/tiny_llm_sft_92m", tmp_path / "out")


def test_demo_model_goes_through_prepare(demo_dir, tmp_path):
    assert is_prepared(demo_dir)
    src = demo_model(tmp_path / "again")
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["tinyllm_demo"] is True and "auto_map" in cfg  # published layout, labelled as the demo
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    manifest = json.loads((demo_dir / MANIFEST).read_text())
    assert manifest["demo"] is True and manifest["random_weights"] is False
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir)
    n = cfg["vocab_size"] - 9
    ids = tok("<|user|>\n你好\n<|assistant|>\n")["input_ids"]
    assert ids[:2] == [n + 1, n + 3] and n + 6 in ids and n + 7 in ids  # [gMASK] sop ... <|user|> <|assistant|>
    assert tok.decode(tok("你好，世界", add_special_tokens=False)["input_ids"]) == "你好，世界"


def test_the_demo_corpus_covers_the_walkthrough():
    answers = corpus_answers()
    for question in ("介绍一下中国。", "世界上最大的动物是什么？", "请介绍一下北京", "你好"):
        assert question in answers and "\ufffd" not in answers[question]


def _modelscope_cache(root: Path, published: Path) -> Path:
    target = root / "models" / "wdn" / "tiny_llm_sft_92m"
    shutil.copytree(published, target, symlinks=False)
    return root


AUTO = """
import json, sys
from tinyllm_vllm.model.sources import ensure_model
path, note = ensure_model("auto", sys.argv[1], verbose=True)
print(json.dumps([str(path), note]))
"""


def _auto(home: Path, **env: str) -> tuple[Path, str]:
    """ensure_model("auto") in a fresh process: modelscope reads its cache location once, at import."""
    base = {k: v for k, v in os.environ.items() if k not in ("VLLM_USE_MODELSCOPE", "HF_ENDPOINT")}
    r = subprocess.run(
        [sys.executable, "-c", AUTO, str(home)],
        capture_output=True,
        text=True,
        timeout=300,
        env=base | {"HF_HUB_OFFLINE": "1"} | env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    path, note = json.loads(r.stdout.splitlines()[-1])
    return Path(path), note


def test_auto_uses_modelscope_when_the_hub_is_offline(tmp_path, published_dir):
    pytest.importorskip("modelscope", reason="modelscope is an optional extra")
    path, note = _auto(
        tmp_path / "home",
        HF_HOME=str(tmp_path / "empty-hf"),
        MODELSCOPE_CACHE=str(_modelscope_cache(tmp_path / "ms", published_dir)),
    )
    assert (
        is_prepared(path) and json.loads((path / MANIFEST).read_text())["source"] == "modelscope:wdn/tiny_llm_sft_92m"
    )
    assert note.startswith("modelscope:wdn/tiny_llm_sft_92m from ModelScope")
    assert "skipped: wdndev/tiny_llm_sft_92m: HF_HUB_OFFLINE is set, and no cached copy was found" in note


def test_vllm_use_modelscope_tries_modelscope_first(tmp_path, published_dir, monkeypatch):
    pytest.importorskip("modelscope", reason="modelscope is an optional extra")
    from tinyllm_vllm.model.sources import auto_order

    monkeypatch.setenv("VLLM_USE_MODELSCOPE", "True")
    assert auto_order()[0] == "modelscope:wdn/tiny_llm_sft_92m"
    # both hubs hold a copy: ModelScope's is taken, and the hub is not even looked at
    path, note = _auto(
        tmp_path / "home",
        VLLM_USE_MODELSCOPE="True",
        HF_HOME=str(_hub_cache(tmp_path / "hf", "wdndev/tiny_llm_sft_92m", published_dir)),
        MODELSCOPE_CACHE=str(_modelscope_cache(tmp_path / "ms", published_dir)),
    )
    assert note.startswith("modelscope:") and "skipped" not in note


def test_auto_falls_back_to_the_demo_model_and_names_both_failures(tmp_path):
    pytest.importorskip("modelscope", reason="modelscope is an optional extra")
    path, note = _auto(
        tmp_path / "home", HF_HOME=str(tmp_path / "empty-hf"), MODELSCOPE_CACHE=str(tmp_path / "empty-ms")
    )
    assert is_prepared(path) and note.startswith("the demo model")
    assert "wdndev/tiny_llm_sft_92m: HF_HUB_OFFLINE is set" in note and "modelscope:wdn/tiny_llm_sft_92m:" in note


def test_an_unreachable_hub_is_given_up_quickly(tmp_path, monkeypatch):
    """No network to the hub: the probe fails at once (or within PROBE_S) and the reason is named."""
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    from tinyllm_vllm.model.sources import PROBE_S

    t = time.monotonic()
    with pytest.raises(CheckpointError, match="is unreachable: .*and no cached copy was found"):
        prepare("wdndev/tiny_llm_sft_92m", tmp_path / "out")
    assert time.monotonic() - t < PROBE_S + 5


def test_a_mistyped_local_path_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(CheckpointError, match="models/tinyllm: no such directory"):
        ensure_model("models/tinyllm", tmp_path / "home")


@pytest.mark.slow
def test_preparing_waits_for_another_process_on_the_same_directory(tmp_path):
    """Two notebooks (or commands) started together in a fresh kit home both build and prepare the demo model:
    each takes the directory's lock, so the second waits and then finds the first one's result instead of
    colliding with its half-made copy. Here the test holds the lock while a command wants the directory."""
    from tinyllm_vllm.model.checkpoint import exclusive

    home = tmp_path / "home"
    code = (
        "import sys\n"
        "from tinyllm_vllm.model.sources import ensure_model\n"
        "print('imported', flush=True)\n"
        "print(ensure_model('demo', sys.argv[1])[0], flush=True)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(home)], stdout=subprocess.PIPE, text=True)
    try:
        with exclusive(home / "demo-src"):
            assert p.stdout.readline() == "imported\n"
            time.sleep(2)
            assert p.poll() is None and not (home / "demo").exists()  # it waits for the lock
        assert p.stdout.readline().strip() == str(home / "demo") and p.wait(timeout=60) == 0
    finally:
        p.kill()
        p.wait()
    assert is_prepared(home / "demo")
