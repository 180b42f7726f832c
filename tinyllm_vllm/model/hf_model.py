"""The transformers reference ``TinyllmForCausalLM``.

TinyLLM is layer for layer Qwen2 (q/k/v bias, no o bias, rotate-half RoPE, RMSNorm, SwiGLU, untied
head) with the same state-dict names, so transformers' own Qwen2 modules are the honest reference:
only the config class differs. Used for parity tests and the transformers baseline benchmark.
"""

from transformers import AutoModelForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM, Qwen2Model, Qwen2PreTrainedModel

from tinyllm_vllm.model.config import TinyllmConfig, register_config


class TinyllmPreTrainedModel(Qwen2PreTrainedModel):
    config_class = TinyllmConfig
    _no_split_modules = ["Qwen2DecoderLayer"]


class TinyllmModel(TinyllmPreTrainedModel, Qwen2Model):
    pass


class TinyllmForCausalLM(TinyllmPreTrainedModel, Qwen2ForCausalLM):
    pass


def register_with_transformers() -> None:
    """Let ``AutoConfig``/``AutoModelForCausalLM`` open ``tinyllm`` checkpoints with no remote code."""
    register_config()
    AutoModelForCausalLM.register(TinyllmConfig, TinyllmForCausalLM, exist_ok=True)
