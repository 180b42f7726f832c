"""tinyllm-vllm: run TinyLLM on vLLM through a plugin.

Importing the package registers ``TinyllmConfig`` with transformers' AutoConfig (as the plugin does
in vLLM's processes), so ``AutoConfig``/``AutoTokenizer`` open prepared checkpoints with no remote
code. torch and vLLM are imported only by the submodules that need them.
"""

__version__ = "0.1.0"

from .config import register_config
from .plugin import register

register_config()


def __getattr__(name: str):
    # the checkpoint helpers pull in sentencepiece/tokenizers: load them on first use
    if name in ("prepare_checkpoint", "demo_model"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)


__all__ = ["register", "prepare_checkpoint", "demo_model", "__version__"]
