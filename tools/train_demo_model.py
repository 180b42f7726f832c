"""Train the embedded demo model: a small TinyLLM that answers the kit's questions.

    .venv/bin/python tools/train_demo_model.py            # writes tinyllm_vllm/demo/{tokenizer.model,model.safetensors}

The corpus is ``tinyllm_vllm/demo/corpus.jsonl``: question/answer pairs (trained in TinyLLM's chat
format, eos after each answer, also as second turns of a conversation) and a few plain texts (so
raw completions continue them). The tokenizer is a SentencePiece BPE trained on the corpus with the
ChatGLM3 options, followed by the 9 ChatGLM tokens, exactly as ``random_model`` builds one. The model
has TinyLLM's architecture with head size 64. Training runs on the CPU (about 2 minutes on 2 cores)
and stops once every greedy answer equals the corpus answer and ends with eos, checked in float32
and in bfloat16 on the bf16 weights that are saved.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file

from tinyllm_vllm.model.config import TinyllmConfig
from tinyllm_vllm.model.demo import DEMO_DIR, DEMO_SHAPE, read_corpus
from tinyllm_vllm.model.hf_model import TinyllmForCausalLM
from tinyllm_vllm.model.tokenizer import CHATGLM_EXTRA_TOKENS, DEFAULT_SYSTEM, EOS_ID, write_tokenizer

SEED = 0
MAX_STEPS = 3000


def train_tokenizer(corpus: list[dict], out: Path) -> Path:
    lines = [DEFAULT_SYSTEM, *CHATGLM_EXTRA_TOKENS]
    for row in corpus:
        lines += [row[k] for k in ("q", "a", "text") if k in row]
    text = out / "spm_input.txt"
    text.write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(out / "tokenizer"),
        model_type="bpe",
        vocab_size=1200,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
        seed_sentencepiece_size=100000,
    )
    return out / "tokenizer.model"


def samples(tok, corpus: list[dict]) -> tuple[list[tuple[list[int], list[int]]], list[tuple[list[int], list[int]]]]:
    """(training samples as (ids, labels), greedy checks as (prompt ids, answer ids + eos))."""
    pairs = [r for r in corpus if "q" in r]
    rng = random.Random(SEED)
    train, checks = [], []

    def chat(messages: list[dict], answer: str) -> None:
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        reply = tok(answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
        train.append((prompt + reply, [-100] * len(prompt) + reply))
        checks.append((prompt, reply))

    for r in pairs:
        chat([{"role": "user", "content": r["q"]}], r["a"])
    # second turns: the history is another pair, so a chat UI's follow-up question gets its answer
    for r in pairs:
        h = rng.choice(pairs)
        chat(
            [
                {"role": "user", "content": h["q"]},
                {"role": "assistant", "content": h["a"]},
                {"role": "user", "content": r["q"]},
            ],
            r["a"],
        )
    for r in corpus:
        if "text" in r:
            ids = tok(r["text"])["input_ids"] + [EOS_ID]  # [gMASK] sop text eos
            train.append((ids, [-100, -100] + ids[2:]))
    return train, checks


def batch(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


@torch.inference_mode()
def greedy_failures(model, checks: list[tuple[list[int], list[int]]], dtype: torch.dtype) -> list[int]:
    """Indices of checks whose greedy continuation is not exactly the answer followed by eos."""
    m = model.to(dtype)
    bad = []
    for i, (prompt, reply) in enumerate(checks):
        out = m.generate(
            torch.tensor([prompt]), max_new_tokens=len(reply), do_sample=False, eos_token_id=None, pad_token_id=0
        )
        if out[0, len(prompt) :].tolist() != reply:
            bad.append(i)
    model.to(torch.float32)
    return bad


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    corpus = read_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spm_model = train_tokenizer(corpus, tmp)
        num_pieces = write_tokenizer(spm_model, tmp)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tmp)
        train, checks = samples(tok, corpus)
        cfg = TinyllmConfig(
            **DEMO_SHAPE,
            vocab_size=num_pieces + len(CHATGLM_EXTRA_TOKENS),
            max_position_embeddings=1024,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        )
        model = TinyllmForCausalLM(cfg).float().train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        ids, labels, mask = batch(train)
        t0 = time.time()
        settled = False
        for step in range(1, MAX_STEPS + 1):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 50 == 0:
                print(f"step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
            if step % 100 == 0 and loss.item() < 0.02:
                model.eval()
                weights = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
                probe = TinyllmForCausalLM(cfg)
                probe.load_state_dict({k: v.float() for k, v in weights.items()})
                bad = greedy_failures(probe, checks, torch.float32) or greedy_failures(probe, checks, torch.bfloat16)
                print(f"step {step}: {len(checks) - len(bad)}/{len(checks)} greedy answers exact", flush=True)
                model.train()
                if not bad and settled:
                    break
                # once every answer is exact, train as long again: wider margins survive vLLM's kernels
                settled = settled or not bad
        else:
            sys.exit(f"not every answer was learnt in {MAX_STEPS} steps")
        DEMO_DIR.mkdir(exist_ok=True)
        (DEMO_DIR / "tokenizer.model").write_bytes(spm_model.read_bytes())
        save_file(
            {k: v.contiguous() for k, v in weights.items()},
            str(DEMO_DIR / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (DEMO_DIR / "model.safetensors").chmod(0o644)
        print(f"wrote {DEMO_DIR} after {step} steps, {time.time() - t0:.0f} s; vocab {cfg.vocab_size}")


if __name__ == "__main__":
    main()
