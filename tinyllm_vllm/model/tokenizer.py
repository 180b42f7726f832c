"""TinyLLM's ChatGLM3 tokenizer as a fast (``tokenizers``) tokenizer, and the training chat template.

The published checkpoint ships a slow remote-code tokenizer that breaks on transformers >= 4.47
(its added-token table gets corrupted, so ``<|assistant|>`` stops being one token). We rebuild the
same tokenizer from ``tokenizer.model`` with the ``tokenizers`` library so that transformers and
vLLM load it with no remote code, and reproduce the original ids exactly:

* SentencePiece BPE with byte fallback; every text segment gets its own dummy-prefix ``▁``;
* only ``[gMASK]``, ``sop``, ``<|user|>`` and ``<|assistant|>`` are matched in raw text (``sop``
  also inside words, as the original does); ``<|system|>`` and the other ChatGLM tokens stay text;
* ``[gMASK] sop`` is prepended when special tokens are added; eos is 2, pad/unk 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# ids 64789.. follow the 64789 SentencePiece pieces, in this order (ChatGLM3 layout).
CHATGLM_EXTRA_TOKENS = [
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]
MATCHED_IN_TEXT = ["[gMASK]", "sop", "<|user|>", "<|assistant|>"]
EOS_ID, PAD_ID = 2, 0
DEFAULT_SYSTEM = "你是由wdndev开发的个人助手。"
# what the chat template appends for the model's turn; the reply follows it
GENERATION_PROMPT = "<|assistant|>\n"
# what ends a reply besides eos: the role tokens the model emits when it starts a new turn
STOP_TOKENS = ["<|user|>", "<|assistant|>", "<|observation|>"]


def extra_token_id(token: str, num_pieces: int) -> int:
    """Id of a ChatGLM token placed after ``num_pieces`` SentencePiece pieces (64789 for TinyLLM)."""
    return num_pieces + CHATGLM_EXTRA_TOKENS.index(token)


def stop_token_ids(num_pieces: int) -> list[int]:
    """eos plus the role tokens; [2, 64795, 64796, 64797] for the real TinyLLM vocabulary."""
    return [EOS_ID] + [extra_token_id(t, num_pieces) for t in STOP_TOKENS]


# The training format (tiny-llm-zh train/tinyllm_dataset.py), byte for byte, for one user turn:
#   [gMASK]sop<|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n
# With history the original `model.chat` (generation_utils.make_context) encoded each line
# separately and joined them with encode("\n") = "▁\n", which is the text " \n" here.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + DEFAULT_SYSTEM + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- set nl = '\\n' if (turns | selectattr('role', 'equalto', 'user') | list | length) <= 1 else ' \\n' -%}"
    "[gMASK]sop<|system|>\n{{ system }}{{ nl }}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}<|user|>\n{{ m['content'] }}{{ nl }}"
    "{%- elif m['role'] == 'assistant' -%}<|assistant|>\n{{ m['content'] }}{{ nl if not loop.last else '' }}"
    "{%- else -%}{{ raise_exception('TinyLLM chat: unsupported role ' ~ m['role'] ~ "
    "' (use system first, then user/assistant)') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}{%- endif -%}"
)


def training_prompt(user: str, system: str = DEFAULT_SYSTEM) -> str:
    """The single-turn prompt text exactly as TinyLLM was fine-tuned on (before [gMASK]sop)."""
    return f"<|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n"


def build_backend(spm_model: str | Path) -> Tokenizer:
    """Build the ``tokenizers.Tokenizer`` equivalent to the original slow ChatGLM3 tokenizer."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {p: i for i, p in enumerate(pieces)}
    # SentencePiece BPE merges the adjacent pair whose result has the highest score; a merge list
    # ranked by that score makes HF's BPE pick the same pairs. Control/unk/byte pieces never merge.
    mergeable = {
        p: sp.get_score(i) for i, p in enumerate(pieces) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
    }
    merges = []
    for piece, score in mergeable.items():
        local = [
            (piece[:k], piece[k:], score)
            for k in range(1, len(piece))
            if piece[:k] in mergeable and piece[k:] in mergeable
        ]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (-m[2], len(m[0]), len(m[1])))
    for j, tok in enumerate(CHATGLM_EXTRA_TOKENS):
        vocab[tok] = n + j

    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=[(a, b) for a, b, _ in merges],
            unk_token=pieces[sp.unk_id()],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    # Added tokens are cut out of the raw text first; the normalizer then runs on each remaining
    # segment, which gives the per-segment dummy prefix of the original.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Decoding: the segment after a matched token starts with its own dummy prefix, which is not
    # part of the text ("Ae|sop|▁'s" is "Aesop's"), so drop one "▁" after each matched token.
    # A reply is a segment of its own too: its first token carries a dummy prefix ("▁北京"), which the
    # original drops by decoding the reply alone. vLLM decodes the reply after the prompt, whose
    # generation prompt ends "<|assistant|>\n", so drop the one "▁" that follows it as well.
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse()]
        + [decoders.Replace(t + "▁", t) for t in MATCHED_IN_TEXT]
        + [decoders.Replace(GENERATION_PROMPT + "▁", GENERATION_PROMPT)]
        + [decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)]
    )
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in MATCHED_IN_TEXT])
    gmask, sop = vocab["[gMASK]"], vocab["sop"]
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] sop $A",
        pair="[gMASK] sop $A $B </s>",
        special_tokens=[("[gMASK]", gmask), ("sop", sop), ("</s>", EOS_ID)],
    )
    return tok


def tokenizer_config(model_max_length: int, num_pieces: int) -> dict:
    """tokenizer_config.json for the fast tokenizer (loaded by AutoTokenizer, no remote code)."""
    added = {}
    for t in MATCHED_IN_TEXT:
        added[str(extra_token_id(t, num_pieces))] = {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": False,
        }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "eos_token": "</s>",
        "bos_token": None,
        # The original matches none of </s>, <unk> in raw text: treat special tokens as text. The four
        # matched tokens are not "special" (the original has no special tokens either), so they
        # still match, and decoding keeps ``sop`` inside words ("philo|sop|hy").
        "split_special_tokens": True,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def write_tokenizer(spm_model: str | Path, out_dir: str | Path, model_max_length: int = 1024) -> int:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into ``out_dir``.

    Returns the number of SentencePiece pieces (the id of the first ChatGLM token)."""
    out_dir = Path(out_dir)
    backend = build_backend(spm_model)
    backend.save(str(out_dir / "tokenizer.json"))
    num_pieces = backend.token_to_id(CHATGLM_EXTRA_TOKENS[0])
    cfg = tokenizer_config(model_max_length, num_pieces)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return num_pieces
