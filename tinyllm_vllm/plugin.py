"""The vLLM plugin: entry point ``vllm.general_plugins: tinyllm = tinyllm_vllm.plugin:register``.

vLLM calls ``register()`` in every process it creates (front end, engine core, workers), so it must
be idempotent and cheap: the model class is registered by import path and imported only where the
model is built, and no CUDA is touched here.
"""

import logging

ARCH = "TinyllmForCausalLM"
MODEL_CLASS = "tinyllm_vllm.model:TinyllmForCausalLM"


def register() -> None:
    """Register TinyLLM's config with transformers' AutoConfig and its model class with vLLM (idempotent)."""
    from vllm import ModelRegistry

    from .config import register_config

    register_config()
    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, MODEL_CLASS)
        _warn_if_untested_vllm()


def supported_architectures() -> list[str]:
    """vLLM's model registry once vLLM has loaded its plugins in this process (what notebook 01 shows)."""
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    return sorted(ModelRegistry.get_supported_archs())


def _warn_if_untested_vllm() -> None:
    from .versions import check_vllm_version

    check = check_vllm_version()
    if not check.ok:
        logging.getLogger("vllm.tinyllm_vllm").warning("tinyllm_vllm: %s", check.detail)
