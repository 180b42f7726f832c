"""Helpers the tests share.

Small data from the original project (the ChatGLM3 tokenizer, the tokenizer goldens) lives in
``tests/data``, so every clone runs tokenizer parity. The 34 MB reference checkpoint for model parity
stays outside the repository: it is read from ``$TINYLLM_FIXTURES`` (default ``../shared/fixtures``).
Without it those tests skip with the reason, and ``make test`` says so loudly at its start and end;
under CI (``CI=true``) a missing fixture fails the test instead, so CI never passes by skipping."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
FIXTURES = Path(os.environ.get("TINYLLM_FIXTURES", ROOT.parent / "shared" / "fixtures"))
MISSING = f"the reference checkpoint is not at {FIXTURES}: set TINYLLM_FIXTURES to the original project's fixtures"


def data_path(*parts: str) -> Path:
    """A file committed under tests/data."""
    return DATA.joinpath(*parts)


def fixture_path(*parts: str) -> Path:
    """A fixture kept outside the repository (the reference checkpoint): skip without it, fail under CI."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"CI needs every fixture: {MISSING}")
        pytest.skip(MISSING)
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


def watchdogs_of(parent: int) -> list[int]:
    """The kit's watchdogs (each leads the process group of one server or router) that ``parent`` started."""
    found = []
    for d in os.scandir("/proc"):
        if d.name.isdigit():
            try:
                cmdline = open(f"/proc/{d.name}/cmdline").read().split("\0")
            except OSError:
                continue
            if "tinyllm_vllm.runtime.procs" in cmdline and str(parent) in cmdline:
                found.append(int(d.name))
    return found


def kill_everything(proc, groups: list[int]) -> None:
    """Whatever a test left (a command and the groups it started): SIGKILL, so the suite goes on clean."""
    import signal

    for pgid in [proc.pid, *groups]:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def ray_python() -> str:
    """The Python of ``make install``'s .venv-ray: this environment's packages plus Ray Data (Ray stays out of
    the main one: vLLM imports it in every engine process where it is installed)."""
    python = Path(os.environ.get("TINYLLM_RAY_VENV", ROOT / ".venv-ray")) / "bin" / "python"
    assert python.exists(), f"{python} is missing: make install creates it (Ray's tests run from it)"
    return str(python)


def cli(
    *args: str, env: dict | None = None, timeout: float = 600, python: str = sys.executable, **kw
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "-m", "tinyllm_vllm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | (env or {}),
        **kw,
    )
