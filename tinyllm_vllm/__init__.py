"""tinyllm-vllm: run TinyLLM on vLLM through a plugin.

Importing the package is cheap (the CLI's ``--help`` and vLLM's plugin loader import it): torch,
transformers and vLLM are imported only by the submodules that need them. Modules that open a
checkpoint register ``TinyllmConfig`` with transformers' AutoConfig first (``config.register_config``).
"""

from tinyllm_vllm.errors import CheckpointError, ConfigError, ServerError, SettingsError, TinyllmError
from tinyllm_vllm.model.plugin import register

__version__ = "0.2.0"

__all__ = ["CheckpointError", "ConfigError", "ServerError", "SettingsError", "TinyllmError", "__version__", "register"]
