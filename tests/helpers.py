"""Helpers the tests share. Data from the original project is read from ../shared/fixtures (or
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
        pytest.skip(f"the original project's fixtures are not at {FIXTURES}: set TINYLLM_FIXTURES to them")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_published(dst: Path, weights_dir: Path, tokenizer_dir: Path, config_patch: dict | None = None) -> Path:
    """A directory laid out like the published HF repo (auto_map, remote-code names, ChatGLM tokenizer)."""
    dst.mkdir(parents=True)
    cfg = json.loads((weights_dir / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "configuration_tinyllm.TinyllmConfig",
        "AutoModelForCausalLM": "modeling_tinyllm.TinyllmForCausalLM",
    }
    cfg.update(config_patch or {})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "model.safetensors").symlink_to(weights_dir / "model.safetensors")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, dst / name)
    (dst / "modeling_tinyllm.py").write_text("raise RuntimeError('remote code must never run')\n")
    return dst
