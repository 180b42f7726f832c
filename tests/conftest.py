"""Shared fixtures. Data from the original project is read from ../shared/fixtures (or
$TINYLLM_FIXTURES) and never committed; tests that need it skip with the reason when it is absent."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("TINYLLM_FIXTURES", ROOT.parent / "shared" / "fixtures"))


def fixture_path(*parts: str) -> Path:
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"fixture {path} not found: set TINYLLM_FIXTURES to the original project's fixtures "
                    f"(tokenizer.model, goldens, reference_tinyllm)")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The 2-layer random-weight checkpoint with greedy goldens from the original modeling code."""
    return fixture_path("reference_tinyllm")


def make_published(dst: Path, weights_dir: Path, tokenizer_dir: Path, config_patch: dict | None = None) -> Path:
    """A directory laid out like the published HF repo (auto_map, remote-code names, ChatGLM tokenizer)."""
    dst.mkdir(parents=True)
    cfg = json.loads((weights_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_tinyllm.TinyllmConfig",
                       "AutoModelForCausalLM": "modeling_tinyllm.TinyllmForCausalLM"}
    cfg.update(config_patch or {})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "model.safetensors").symlink_to(weights_dir / "model.safetensors")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, dst / name)
    (dst / "modeling_tinyllm.py").write_text("raise RuntimeError('remote code must never run')\n")
    return dst


@pytest.fixture(scope="session")
def published_dir(tmp_path_factory, reference_dir) -> Path:
    """Reference weights + the real ChatGLM3 tokenizer, in the published repo's layout."""
    return make_published(tmp_path_factory.mktemp("pub") / "tiny_llm_sft_92m", reference_dir,
                          fixture_path("chatglm3_tokenizer"))


@pytest.fixture(scope="session")
def prepared_ref(tmp_path_factory, published_dir) -> Path:
    from tinyllm_vllm.checkpoint import prepare_checkpoint

    return prepare_checkpoint(published_dir, tmp_path_factory.mktemp("prep") / "ref")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The embedded random-weight demo model, prepared (needs no fixture)."""
    from tinyllm_vllm.checkpoint import demo_model, prepare_checkpoint

    base = tmp_path_factory.mktemp("demo")
    return prepare_checkpoint(demo_model(base / "src"), base / "prepared")


@pytest.fixture(scope="session")
def cpu_settings(tmp_path_factory):
    from tinyllm_vllm.settings import Settings

    s = Settings(home=tmp_path_factory.mktemp("home"), device="cpu", dtype="float32", max_model_len=512,
                 kv_cache_gb=0.5)
    return s.resolved()
