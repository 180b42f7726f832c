"""The vLLM model class ``TinyllmForCausalLM``, built from vLLM's public layers.

Tensor-parallel ready (QKV/merged/row parallel linears, vocab-parallel embedding and head),
pipeline-parallel aware, compiled with ``@support_torch_compile``. One code path for vLLM 0.26-0.33:
keyword arguments after the first three of ``Attention`` (0.25 inserted a positional parameter),
no ``skip_prefixes`` (removed from ``AutoWeightsLoader`` in 0.29), explicit q/k/v and gate/up
stacking in ``load_weights``.

No ``from __future__ import annotations`` here: ``support_torch_compile`` reads the annotations of
``forward`` at class creation to find the dynamic dimensions.
"""

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    PPMissingLayer,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from tinyllm_vllm.errors import CheckpointError, ConfigError
from tinyllm_vllm.model.config import TinyllmConfig, expected_tensor_names

# under the "vllm" logger so the line shows up in vLLM's own log format and handlers
logger = init_logger("vllm.tinyllm_vllm")

# Head sizes of vLLM's CPU attention backend (CPUAttentionBackend.get_supported_head_sizes, 0.20-0.33).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# checkpoint name fragment -> (fused vLLM parameter, shard id)
STACKED = [
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
]


def check_supported(config: TinyllmConfig, device_type: str) -> None:
    """Fail early, naming the field, for configs vLLM would reject with a less helpful message."""
    config.check()
    head = config.hidden_size // config.num_attention_heads
    if device_type == "cpu" and head not in CPU_HEAD_SIZES:
        raise ConfigError(
            f"config.json: head size hidden_size/num_attention_heads = {config.hidden_size}/"
            f"{config.num_attention_heads} = {head} is not supported by vLLM's CPU attention "
            f"(supported: {', '.join(map(str, CPU_HEAD_SIZES))})"
        )


class TinyllmAttention(nn.Module):
    def __init__(
        self,
        config: TinyllmConfig,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        total_heads, total_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // total_heads
        self.num_heads = total_heads // tp
        # fewer kv heads than ranks: each rank keeps a replica
        self.num_kv_heads = max(1, total_kv // tp)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            total_heads,
            total_kv,
            bias=True,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            total_heads * self.head_dim,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        rope = getattr(config, "rope_parameters", None) or {
            "rope_type": "default",
            "rope_theta": getattr(config, "rope_theta", 10000.0),
        }
        # is_neox_style=True is HF's rotate_half, the variant TinyLLM was trained with
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_position_embeddings, is_neox_style=True, rope_parameters=rope
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class TinyllmMLP(nn.Module):
    def __init__(self, config: TinyllmConfig, quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class TinyllmDecoderLayer(nn.Module):
    def __init__(
        self,
        config: TinyllmConfig,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.self_attn = TinyllmAttention(config, cache_config, quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = TinyllmMLP(config, quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # the residual add is fused into RMSNorm(x, residual)
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile
class TinyllmModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.config = config
        pp = get_pp_group()
        self.embed_tokens = (
            VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, quant_config=quant_config, prefix=f"{prefix}.embed_tokens"
            )
            if pp.is_first_rank
            else PPMissingLayer()
        )
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: TinyllmDecoderLayer(config, cache_config, quant_config, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if pp.is_last_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        # islice, not self.layers[a:b]: slicing a ModuleList builds a new module on every step
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            for fused, part, shard in STACKED:
                if part in name:
                    target = name.replace(part, fused)
                    if is_pp_missing_parameter(target, self):
                        break
                    param = params[target]
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                target = name
                if is_pp_missing_parameter(target, self):
                    continue
                if target not in params:
                    raise CheckpointError(f"checkpoint tensor {name!r} has no place in TinyllmForCausalLM")
                param = params[target]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        return loaded


class TinyllmForCausalLM(nn.Module, SupportsPP, SupportsLoRA):
    """TinyLLM for vLLM: Qwen2-shaped decoder with q/k/v bias, rotate-half RoPE and an untied head."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    embedding_modules: dict[str, str] = {}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        from vllm.platforms import current_platform

        config = vllm_config.model_config.hf_config
        check_supported(config, current_platform.device_type)
        # the line tests and learners look for: the plugin's class, built in vLLM's worker process
        logger.info("tinyllm_vllm: building TinyllmForCausalLM from the plugin (%s)", __name__)
        self.config = config
        self.model = TinyllmModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        seen: list[str] = []

        def tracked() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                seen.append(name)
                yield name, tensor

        loaded = AutoWeightsLoader(self).load_weights(tracked())
        # vLLM only checks fused parameters, so a checkpoint without k_proj would load silently.
        if get_pp_group().world_size == 1:
            missing = sorted(set(expected_tensor_names(self.config)) - set(seen))
            if missing:
                raise CheckpointError(
                    f"checkpoint is missing tensor(s): {', '.join(missing[:5])}"
                    + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
                )
        return loaded
