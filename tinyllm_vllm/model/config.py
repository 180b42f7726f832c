"""``TinyllmConfig``: the transformers configuration for model_type ``tinyllm``.

Fields and defaults follow the original ``configuration_tinyllm.py`` (Llama-7B-like defaults, not
the 92M values: those come from the checkpoint's config.json). On transformers 5 a legacy
``rope_theta`` key is folded into ``rope_parameters`` by the base class.
"""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from tinyllm_vllm.errors import ConfigError

# TinyLLM's MLP is SwiGLU; the vLLM model fuses gate/up with SiluAndMul, so nothing else can load.
SUPPORTED_HIDDEN_ACT = "silu"


@strict
class TinyllmConfig(PreTrainedConfig):
    """Configuration of a TinyLLM model (Qwen2-shaped: q/k/v bias, rotate-half RoPE, untied head)."""

    model_type = "tinyllm"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 64797
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: float | int = 0.0

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise :class:`~tinyllm_vllm.errors.ConfigError` naming the first field TinyLLM cannot run."""
        if self.hidden_act != SUPPORTED_HIDDEN_ACT:
            raise ConfigError(
                f"config.json field 'hidden_act' is {self.hidden_act!r}; TinyLLM only supports "
                f"{SUPPORTED_HIDDEN_ACT!r} (SwiGLU MLP)"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"config.json field {name!r} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config.json field 'hidden_size' ({self.hidden_size}) is not a multiple of "
                f"'num_attention_heads' ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json field 'num_attention_heads' ({self.num_attention_heads}) is not a multiple "
                f"of 'num_key_value_heads' ({self.num_key_value_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # What transformers' Qwen2 building blocks read; TinyLLM has no sliding window.
    @property
    def layer_types(self) -> list[str]:
        return ["full_attention"] * self.num_hidden_layers

    @property
    def sliding_window(self) -> None:
        return None


def expected_tensor_names(config: TinyllmConfig) -> list[str]:
    """The state-dict names a complete TinyLLM checkpoint holds (the published layout)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{n}_proj.{w}" for n in "qkv" for w in ("weight", "bias")]
        names += [p + "self_attn.o_proj.weight"]
        names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    return names


def register_config() -> None:
    """Let ``AutoConfig`` (and so vLLM) read ``model_type: tinyllm`` with no remote code."""
    AutoConfig.register("tinyllm", TinyllmConfig, exist_ok=True)


# whoever imports the config class means to open TinyLLM checkpoints with transformers
register_config()
