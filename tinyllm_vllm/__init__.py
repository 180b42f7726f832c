"""tinyllm-vllm: run TinyLLM on vLLM through a plugin.

Kept import-light: vLLM imports this package in every engine process through the plugin entry
point, so heavy modules (torch, vllm) are imported by the submodules that need them.
"""

__version__ = "0.1.0"

from .plugin import register  # noqa: E402


def prepare_checkpoint(src, out, **kwargs):
    """Turn a TinyLLM checkpoint into a directory vLLM and transformers load faithfully."""
    from .checkpoint import prepare_checkpoint as _prepare

    return _prepare(src, out, **kwargs)


def demo_model(out, **kwargs):
    """Build the small random-weight TinyLLM laid out like the published repo."""
    from .checkpoint import demo_model as _demo

    return _demo(out, **kwargs)


__all__ = ["register", "prepare_checkpoint", "demo_model", "__version__"]
