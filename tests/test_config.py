import json

import pytest
from transformers import AutoConfig

from tinyllm_vllm.errors import ConfigError
from tinyllm_vllm.model.config import TinyllmConfig, expected_tensor_names


def test_defaults_follow_the_original_configuration():
    c = TinyllmConfig()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64797, 4096, 11008, 32)
    assert c.num_key_value_heads == c.num_attention_heads == 32
    assert c.rope_parameters["rope_theta"] == 10000.0
    assert c.tie_word_embeddings is False and c.hidden_act == "silu"


def test_published_92m_config_loads_through_autoconfig(tmp_path):
    published = {
        "architectures": ["TinyllmForCausalLM"],
        "model_type": "tinyllm",
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "vocab_size": 64798,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "auto_map": {"AutoConfig": "configuration_tinyllm.TinyllmConfig"},
    }
    (tmp_path / "config.json").write_text(json.dumps(published))
    c = AutoConfig.from_pretrained(tmp_path)  # registered by importing tinyllm_vllm.model.config
    assert isinstance(c, TinyllmConfig) and c.head_dim == 64
    # the published 92M checkpoint: 92,064,256 parameters (184 MB in 16-bit, the size of its weight file)
    import math

    from tinyllm_vllm.model.checkpoint import expected_shapes

    assert sum(math.prod(s) for s in expected_shapes(c).values()) == 92_064_256
    assert len(expected_tensor_names(c)) == 3 + 8 * 12


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("hidden_act", "gelu", "'hidden_act'"),
        ("num_attention_heads", 3, "'hidden_size'"),
        ("num_key_value_heads", 3, "'num_attention_heads'"),
    ],
)
def test_unsupported_fields_are_named(field, value, needle):
    kwargs = {"hidden_size": 128, "num_attention_heads": 2, field: value}
    with pytest.raises(ConfigError, match=needle):
        TinyllmConfig(**kwargs)
