"""The vLLM plugin: entry point ``vllm.general_plugins: tinyllm = tinyllm_vllm.model.plugin:register``.

vLLM calls ``register()`` in every process it creates (front end, engine core, workers), so it must
be idempotent and cheap: the model class is registered by import path and imported only where the
model is built, and no CUDA is touched here.
"""

import importlib.util
import logging
import os
from pathlib import Path

ARCH = "TinyllmForCausalLM"
MODEL_CLASS = "tinyllm_vllm.model.vllm_model:TinyllmForCausalLM"
# set to 1 in the environment of engines that start together on one node under Ray (the kit's Ray Serve app)
OWN_DP_PORT = "TINYLLM_OWN_DP_MASTER_PORT"


def register() -> None:
    """Register TinyLLM's config with transformers' AutoConfig and its model class with vLLM (idempotent)."""
    from vllm import ModelRegistry

    from tinyllm_vllm.model.config import register_config

    register_config()
    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, MODEL_CLASS)
        _warn_if_untested_vllm()
    if os.environ.get(OWN_DP_PORT) == "1":
        own_dp_master_port()


def register_class_here() -> None:
    """Register the model class itself in this process, not its import path: vLLM then inspects the class
    here instead of in a fresh Python process, which it does for a plugin's model whose inspection is not
    in its cache yet (the first start in a kit home: 12 s on 2 CPU cores). Importing the model module here
    costs less, and an engine core forked from this process finds it imported. The inspection is then
    left in vLLM's cache for the servers started later."""
    from vllm import ModelRegistry

    from tinyllm_vllm.model.config import register_config
    from tinyllm_vllm.model.vllm_model import TinyllmForCausalLM

    register_config()
    ModelRegistry.register_model(ARCH, TinyllmForCausalLM)
    _save_inspection(TinyllmForCausalLM)


def _save_inspection(model_cls: type) -> None:
    """Leave this class's inspection in vLLM's cache, where a server's front end (which registers the class
    by import path) looks before inspecting it in a fresh Python process (18 s on a 16-core H200 machine).

    vLLM has no public call for this, so these are its registry's internals; if they change, the server
    only inspects the class itself, as it would without this."""
    try:
        from vllm.model_executor.models.registry import _LazyRegisteredModel, _ModelInfo

        module, name = MODEL_CLASS.split(":")
        lazy = _LazyRegisteredModel(module, name)
        module_hash = lazy._get_modelinfo_module_hash(Path(importlib.util.find_spec(module).origin))
        if lazy._load_modelinfo_from_cache(module_hash) is None:
            lazy._save_modelinfo_to_cache(_ModelInfo.from_model_cls(model_cls), module_hash)
    except Exception as e:  # a cache miss costs time, not correctness
        logging.getLogger(__name__).debug("tinyllm_vllm: model inspection not cached: %s", e)


def own_dp_master_port() -> None:
    """Give this engine a data-parallel master port of its own (``VLLM_DP_MASTER_PORT``, unless one is set).

    vLLM 0.26's Ray executor looks for its torch.distributed port from that port + 100 even in an engine
    without data parallelism. Every Ray Serve replica on a node has the same default (0), so replicas
    starting together all find port 100 free, all but one then fail to bind it, and Ray restarts them one
    by one (minutes). The port is excluded from vLLM's compile-cache key, so the cache is still shared."""
    if "VLLM_DP_MASTER_PORT" not in os.environ:
        from vllm.utils.network_utils import get_open_port

        os.environ["VLLM_DP_MASTER_PORT"] = str(get_open_port())


def supported_architectures() -> list[str]:
    """vLLM's model registry once vLLM has loaded its plugins in this process (what notebook 01 shows)."""
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    return sorted(ModelRegistry.get_supported_archs())


def _warn_if_untested_vllm() -> None:
    from tinyllm_vllm.model.versions import check_vllm_version

    check = check_vllm_version()
    if not check.ok:
        logging.getLogger("vllm.tinyllm_vllm").warning("tinyllm_vllm: %s", check.detail)
