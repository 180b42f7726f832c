"""Property-based tests (hypothesis) of the tokenizer and of prepare's all-or-nothing output."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyllm_vllm.model.checkpoint import MANIFEST, CheckpointError, prepare_checkpoint

from helpers import data_path, make_published

# "▁" (U+2581) is SentencePiece's space marker: it decodes to " " in every SentencePiece tokenizer
TEXT = st.text(st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",)), max_size=60)
MARKERS = st.sampled_from(["[gMASK]", "sop", "<|user|>", "<|assistant|>", "<|system|>", "</s>", " ", "\n", "中文"])


@pytest.fixture(scope="module")
def tok(prepared_ref):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prepared_ref)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(TEXT, MARKERS), max_size=6))
def test_decode_of_encode_is_the_text(tok, parts):
    text = "".join(parts)
    # one exception by design: after the generation prompt "<|assistant|>\n" a reply's first space is its
    # dummy prefix, not text (the original decoded replies alone), so it is dropped there
    expected = text.replace("<|assistant|>\n ", "<|assistant|>\n")
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == expected


FIELDS = {
    "hidden_size": st.one_of(st.integers(-4, 300), st.text(max_size=3), st.none()),
    "num_attention_heads": st.one_of(st.integers(-2, 9), st.floats(allow_nan=True)),
    "vocab_size": st.one_of(st.integers(0, 70000), st.booleans()),
    "hidden_act": st.sampled_from(["silu", "gelu", "", None]),
    "model_type": st.sampled_from(["tinyllm", "qwen2", None]),
    "rope_theta": st.one_of(st.floats(), st.text(max_size=2)),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patch=st.fixed_dictionaries({}, optional=FIELDS), cut=st.one_of(st.none(), st.integers(0, 4000)))
def test_prepare_is_all_or_nothing(tmp_path_factory, reference_dir, patch, cut):
    """Whatever the config or a truncation does, OUT is either complete or absent (never half-written)."""
    work = tmp_path_factory.mktemp("prop")
    src = make_published(work / "src", reference_dir, data_path("chatglm3_tokenizer"), patch)
    if cut is not None:
        data = (reference_dir / "model.safetensors").read_bytes()
        (src / "model.safetensors").unlink()
        (src / "model.safetensors").write_bytes(data[:cut])
    out = work / "out"
    try:
        prepare_checkpoint(src, out)
    except CheckpointError:
        assert not out.exists()
    else:
        assert (out / MANIFEST).is_file() and json.loads((out / "config.json").read_text())["model_type"] == "tinyllm"
    assert sorted(p.name for p in work.iterdir()) in (["src"], ["out", "src"])
    shutil.rmtree(work)
