"""Environment checks with OK/FAIL lines: versions, device, vLLM build, plugin, prepared model.

Nothing here starts an engine or initialises CUDA. Every check judges what it is about on the
machine at hand, so the same checks are right on the CUDA stack and on the CPU stack.
"""

from __future__ import annotations

import importlib.metadata as md
import shutil
import sys
from pathlib import Path

from tinyllm_vllm.model.versions import DIST, Check, check_vllm_version
from tinyllm_vllm.runtime import procs
from tinyllm_vllm.runtime.procs import gpus

# vLLM's CUDA wheels require these; PyPI's builds of them are CUDA builds, which fail to import next to
# a CPU torch (``operator torchvision::nms does not exist``) and take ``import transformers`` down too
TORCH_COMPANIONS = ("torchvision", "torchaudio", "torchcodec")


IMPORT_EACH = """
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:
        print(name, "|", type(e).__name__ + ": " + (str(e).splitlines() or [""])[0])
"""


def check_torch_companions() -> list[Check]:
    """torchvision & co. must import next to the installed torch (a fresh process tries each)."""
    installed = {}
    for name in TORCH_COMPANIONS:
        try:
            installed[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    if not installed:
        return []
    torch_version = md.version("torch")
    r = procs.run([sys.executable, "-c", IMPORT_EACH, *installed], timeout=300)
    failed = dict(line.split(" | ", 1) for line in r.stdout.splitlines() if " | " in line)
    checks = []
    for name, version in installed.items():
        if name in failed:
            checks.append(
                Check(
                    False,
                    name,
                    f"{version} does not import next to torch {torch_version} "
                    f"({failed[name]}), which also breaks `import transformers`: "
                    f"pip uninstall {name}, or install the build matching torch",
                )
            )
        else:
            checks.append(Check(True, name, f"{version} (imports next to torch {torch_version})"))
    return checks


def check_model_dir(model_dir: str) -> Check:
    from tinyllm_vllm.model.checkpoint import MANIFEST, is_prepared

    path = Path(model_dir).expanduser()
    if not path.exists():
        return Check(False, "prepared model", f"{path}: no such directory")
    if not is_prepared(path):
        return Check(False, "prepared model", f"{path} has no {MANIFEST}: run `tinyllm-vllm prepare SRC {path}`")
    return Check(True, "prepared model", str(path))


def checks(model_dir: str | None = None) -> list[Check]:
    """Run every check."""
    import platform

    from tinyllm_vllm.settings import detect_device

    out = [Check(True, "python", platform.python_version())]
    for pkg in ("torch", "transformers", "tokenizers", "openai", DIST):
        try:
            out.append(Check(True, pkg, md.version(pkg)))
        except md.PackageNotFoundError:
            out.append(Check(False, pkg, "not installed"))
    out.append(check_vllm_version())
    out += check_torch_companions()
    device = detect_device()
    detail = device
    if device == "cuda" and gpus():
        detail += ": " + "; ".join(f"{g['name']}, {g['memory_gib']:.0f} GiB" for g in gpus())
    out.append(Check(True, "device", detail))
    if device == "cpu":
        out.append(
            Check(
                shutil.which("g++") is not None,
                "g++",
                shutil.which("g++") or "missing: torch.compile on CPU needs a C++ compiler",
            )
        )
    eps = [ep for ep in md.entry_points(group="vllm.general_plugins") if ep.name == "tinyllm"]
    out.append(
        Check(
            bool(eps),
            "vLLM plugin entry point",
            eps[0].value if eps else "not found: install the package (pip install -e .)",
        )
    )
    if model_dir:
        out.append(check_model_dir(model_dir))
    return out
