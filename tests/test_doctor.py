"""``doctor`` judges the torchvision rule by what it is about: a torchvision that cannot import next to torch."""

import importlib.metadata as md
import os
import re
import subprocess
import sys

import pytest


def pypi_torchvision(target) -> None:
    """PyPI's own torchvision for this torch (a CUDA build), into ``target``; skip when PyPI is unreachable."""
    torch = re.sub(r"\+.*", "", md.version("torch"))
    major, minor = torch.split(".")[:2]
    wanted = f"torchvision=={int(major) - 2}.{int(minor) + 15}.*"  # torch 2.13 pairs with torchvision 0.28
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            "--index-url",
            "https://pypi.org/simple",
            wanted,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0:
        pytest.skip(f"could not download {wanted} from PyPI: {r.stderr.strip().splitlines()[-1:]}")


def doctor(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinyllm_vllm.cli", "doctor"],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | env,
    )


def test_cuda_torchvision_next_to_cpu_torch_fails(tmp_path):
    if "+cpu" not in md.version("torch"):
        pytest.skip("needs the CPU build of torch (this is the CPU stack's check)")
    pypi_torchvision(tmp_path)
    r = doctor({"PYTHONPATH": str(tmp_path)})
    line = next(ln for ln in r.stdout.splitlines() if "torchvision" in ln)
    assert line.startswith("[FAIL] torchvision: ") and "does not import next to torch" in line
    assert "operator torchvision::nms does not exist" in line and "pip uninstall torchvision" in line
    assert r.returncode == 1


def test_a_torchvision_that_imports_is_ok(tmp_path):
    """On a CUDA stack vLLM needs torchvision, and it imports: OK (stands in here: a package that imports)."""
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import torch\n")
    dist = tmp_path / "torchvision-0.26.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.26.0\n")
    r = doctor({"PYTHONPATH": str(tmp_path)})
    line = next(ln for ln in r.stdout.splitlines() if "torchvision" in ln)
    assert line.startswith("[OK] torchvision: 0.26.0 (imports next to torch ")
