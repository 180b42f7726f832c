"""The kit installed as a package (a wheel, not editable) has every file it reads at run time."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


@pytest.mark.slow
def test_a_wheel_install_builds_the_demo_model_and_prepares_it(tmp_path):
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp_path / "dist"),
        str(ROOT),
    )
    (wheel,) = (tmp_path / "dist").glob("tinyllm_vllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("model/demo/corpus.jsonl", "model/demo/tokenizer.model", "model/demo/model.safetensors", "py.typed"):
        assert f"tinyllm_vllm/{data}" in names, f"{data} is not in the wheel"
    # a fresh environment that sees this one's dependencies but not its editable install of the kit
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    site = run(sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    fresh = run(str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (Path(fresh.stdout.strip()) / "deps.pth").write_text(site + "\n")
    run(str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel))
    script = (
        "import sys, tinyllm_vllm\n"
        "from tinyllm_vllm.model.demo import demo_model\n"
        "from tinyllm_vllm.model.checkpoint import prepare_checkpoint\n"
        "assert '/venv/' in tinyllm_vllm.__file__, tinyllm_vllm.__file__\n"
        "out = prepare_checkpoint(demo_model(sys.argv[1] + '/src'), sys.argv[1] + '/out')\n"
        "print(out)\n"
    )
    r = run(str(venv / "bin" / "python"), "-c", script, str(tmp_path), cwd=tmp_path)
    assert (tmp_path / "out" / "tinyllm_manifest.json").is_file(), r.stdout
