"""The prepared fast tokenizer against ids produced by the original slow ChatGLM3 tokenizer."""

import pytest
from transformers import AutoTokenizer

from tinyllm_vllm.model.tokenizer import DEFAULT_SYSTEM, training_prompt

from helpers import data_path, read_jsonl


@pytest.fixture(scope="module")
def tok(prepared_tokenizer):
    return AutoTokenizer.from_pretrained(prepared_tokenizer)  # no trust_remote_code


@pytest.mark.parametrize("golden", ["tokenizer_golden.jsonl", "tokenizer_golden_random.jsonl"])
def test_ids_equal_the_original_tokenizer(tok, golden):
    cases = read_jsonl(data_path(golden))
    bad = [c["text"] for c in cases if tok(c["text"])["input_ids"] != c["ids"]]
    bad_ns = [c["text"] for c in cases if tok(c["text"], add_special_tokens=False)["input_ids"] != c["ids_no_special"]]
    assert not bad and not bad_ns, f"{len(bad)}+{len(bad_ns)} of {len(cases)} differ, e.g. {(bad or bad_ns)[:3]!r}"


def test_decoding_gives_back_the_text(tok):
    cases = read_jsonl(data_path("tokenizer_golden_random.jsonl")) + read_jsonl(data_path("tokenizer_golden.jsonl"))
    bad = [c["text"] for c in cases if tok.decode(c["ids_no_special"]) != c["text"]]
    assert not bad, bad[:3]


def test_layout_and_special_ids(tok):
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (2, 0, 64798)
    assert tok.convert_tokens_to_ids(["[gMASK]", "sop", "<|user|>", "<|assistant|>"]) == [64790, 64792, 64795, 64796]
    assert tok("<|system|>", add_special_tokens=False)["input_ids"] == [906, 31007, 13361, 31007, 30994]
    assert tok.decode([36474, 54591, 2], skip_special_tokens=True) == "你好"


def test_chat_template_renders_the_training_format(tok):
    msgs = [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": "介绍一下中国。"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "[gMASK]sop" + training_prompt("介绍一下中国。")
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == tok(training_prompt("介绍一下中国。"))["input_ids"]
    # the 28 ids the original slow tokenizer gives for this prompt
    assert ids == [
        64790,
        64792,
        906,
        31007,
        13361,
        31007,
        30994,
        13,
        54622,
        33702,
        17953,
        30916,
        8239,
        43809,
        31745,
        42481,
        31155,
        13,
        64795,
        30910,
        13,
        48875,
        31626,
        31155,
        13,
        64796,
        30910,
        13,
    ]
    # without a system message the default system text is used
    assert tok.apply_chat_template(msgs[1:], add_generation_prompt=True, tokenize=False) == text


def test_multi_turn_matches_the_original_make_context(tok):
    """The original model.chat encoded each line separately and joined them with encode('\\n')."""

    def enc(s, special=False):
        return tok(s, add_special_tokens=special)["input_ids"]

    nl = enc("\n")
    history = [("你好", "你好，我是助手。"), ("1+1=?", "2")]
    q = "再见"
    expected = enc(f"<|system|>\n{DEFAULT_SYSTEM}", special=True) + nl
    for u, a in history:
        expected += enc(f"<|user|>\n{u}") + nl + enc(f"<|assistant|>\n{a}") + nl
    expected += enc(f"<|user|>\n{q}") + nl + enc("<|assistant|>") + nl
    msgs = []
    for u, a in history:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": q})
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False) == expected


@pytest.mark.parametrize("golden", ["tokenizer_golden.jsonl", "tokenizer_golden_random.jsonl"])
def test_a_streamed_reply_is_its_original_decode(tok, golden):
    """vLLM decodes a reply incrementally after the prompt (``DecodeStream`` primed with the prompt's ids);
    the original decoded the reply alone. Both must give the same text: no stray leading space."""
    from tokenizers.decoders import DecodeStream

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "介绍一下中国。"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    bad = []
    for case in read_jsonl(data_path(golden)):
        stream = DecodeStream(ids=prompt, skip_special_tokens=False)
        text = "".join(piece or "" for piece in (stream.step(tok._tokenizer, i) for i in case["ids_no_special"]))
        if text != case["text"]:
            bad.append((case["text"][:30], text[:30]))
    assert not bad, f"{len(bad)} replies differ from the original decode, e.g. {bad[:3]}"


def test_unknown_role_is_rejected(tok):
    with pytest.raises(Exception, match="unsupported role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
