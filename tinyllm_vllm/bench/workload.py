"""The requests a benchmark sends: a chat-like mix and the fixed workload, seeded and reproducible.

Chat-like (the headline): prompt lengths uniform in ``prompt_range`` tokens; reply lengths drawn
from a log-normal with median ``reply_median`` and shape ``reply_sigma``, clipped to
``[reply_min, reply_max]``. Each request asks for exactly its reply length (``max_tokens`` with
``ignore_eos``): random-weight models never say eos, so the drawn length stands in for where a
real answer would end. Fixed: every prompt ``input_len`` tokens, every reply ``output_len`` (the
best case for static batching, where no request waits for a longer one).

Prompts are text: random pieces of the model's own vocabulary, decoded. The engines tokenize them
as vLLM's ``vllm bench`` does (``tokenizer(prompt)``, with ``[gMASK]sop``). ``to_sharegpt`` writes the
same requests in the ShareGPT layout that ``vllm bench throughput`` and ``vllm bench serve`` read:
there a request's output length is the token count of its reply text, so each reply is a filler text
of exactly the requested length.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# below these ids the vocabulary holds <unk>, <s>, </s> and the 256 byte pieces; the last 9 are ChatGLM's
FIRST_TEXT_ID, CHATGLM_TOKENS = 259, 9


@dataclass(frozen=True)
class ChatLike:
    """A chat-like workload's distribution (every field is a stated, documented parameter)."""

    requests: int = 1024
    prompt_range: tuple[int, int] = (16, 384)
    reply_median: int = 100
    reply_sigma: float = 0.8
    reply_min: int = 8
    reply_max: int = 512
    seed: int = 0
    name: str = field(default="chat-like", init=False)

    def lengths(self) -> list[tuple[int, int]]:
        rng = random.Random(self.seed)
        out = []
        for _ in range(self.requests):
            prompt = rng.randint(*self.prompt_range)
            reply = round(rng.lognormvariate(math.log(self.reply_median), self.reply_sigma))
            out.append((prompt, min(self.reply_max, max(self.reply_min, reply))))
        return out

    def describe(self) -> str:
        lo, hi = self.prompt_range
        return (
            f"{self.requests} requests; prompt length uniform in [{lo}, {hi}] tokens; reply length log-normal, "
            f"median {self.reply_median}, sigma {self.reply_sigma}, clipped to [{self.reply_min}, {self.reply_max}]; "
            f"seed {self.seed}"
        )


@dataclass(frozen=True)
class Fixed:
    """Every prompt ``input_len`` tokens, every reply ``output_len``: the best case for static batching."""

    requests: int = 1024
    input_len: int = 128
    output_len: int = 128
    seed: int = 0
    name: str = field(default="fixed", init=False)

    def lengths(self) -> list[tuple[int, int]]:
        return [(self.input_len, self.output_len)] * self.requests

    def describe(self) -> str:
        return (
            f"{self.requests} requests x {self.input_len} prompt + {self.output_len} reply tokens "
            f"(best case for static batching); seed {self.seed}"
        )


Distribution = ChatLike | Fixed


def build(dist: Distribution, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """The requests: ``{"prompt": text, "output_tokens": n}``. A prompt of n random pieces re-tokenizes
    to about n tokens (adjacent pieces can merge); ``stats`` reports the lengths actually sent."""
    rng = random.Random(dist.seed + 1)
    top = len(tokenizer) - CHATGLM_TOKENS
    rows = []
    for prompt_len, reply_len in dist.lengths():
        ids = [rng.randrange(FIRST_TEXT_ID, top) for _ in range(max(1, prompt_len - 2))]  # [gMASK]sop are 2
        rows.append({"prompt": tokenizer.decode(ids), "output_tokens": reply_len})
    return rows


def stats(rows: list[dict], tokenizer: PreTrainedTokenizerBase) -> dict:
    prompts = [len(tokenizer(r["prompt"])["input_ids"]) for r in rows]
    replies = [r["output_tokens"] for r in rows]

    def summary(xs: list[int]) -> dict:
        return {
            "min": min(xs),
            "median": statistics.median(xs),
            "mean": round(statistics.fmean(xs), 1),
            "max": max(xs),
            "total": sum(xs),
        }

    return {"requests": len(rows), "prompt_tokens": summary(prompts), "reply_tokens": summary(replies)}


def describe(dist: Distribution) -> dict:
    return {"name": dist.name, "description": dist.describe(), "parameters": asdict(dist)}


def to_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write the requests as JSONL (``vllm bench ... --dataset-name custom --skip-chat-template``)."""
    path = Path(path)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def filler(tokenizer: PreTrainedTokenizerBase) -> str:
    """A character that, repeated with spaces between ("a a a"), is one token per repetition."""
    chars = sorted(p[1] for p in tokenizer.get_vocab() if len(p) == 2 and p[0] == "\u2581" and p[1].isalnum())
    for char in chars:
        if all(len(tokenizer(" ".join([char] * k), add_special_tokens=False)["input_ids"]) == k for k in (1, 13, 100)):
            return char
    raise ValueError("no single-token filler found in this vocabulary")


def to_sharegpt(rows: list[dict], tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """The requests in the ShareGPT layout ``vllm bench`` reads: a human turn (the prompt) and a gpt turn
    whose token count, ``[gMASK]sop`` included as ``vllm bench`` counts it, is the reply length."""
    char = filler(tokenizer)
    special = len(tokenizer("")["input_ids"])
    data = [
        {
            "id": str(i),
            "conversations": [
                {"from": "human", "value": r["prompt"]},
                {"from": "gpt", "value": " ".join([char] * (r["output_tokens"] - special))},
            ],
        }
        for i, r in enumerate(rows)
    ]
    path = Path(path)
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    # split on "\n" only: prompts of random pieces can hold other line separators (U+2028, U+0085)
    return [json.loads(line) for line in Path(path).read_text().split("\n") if line.strip()]


def token_request(dist: ChatLike, vocab_size: int, i: int, prefix: tuple[int, ...] = ()) -> tuple[list[int], int]:
    """Request ``i`` of an endless stream from ``dist``'s distribution and seed, as prompt token ids (``prefix``,
    the tokenizer's ``[gMASK]sop``, then random text pieces) and its reply length. Any process makes the same
    request ``i``: the offline engines, the serving load (decoded to text) and the batch share one set."""
    import numpy as np

    rng = np.random.default_rng((dist.seed, i))
    lo, hi = dist.prompt_range
    prompt = int(rng.integers(lo, hi + 1))
    reply = round(float(rng.lognormal(math.log(dist.reply_median), dist.reply_sigma)))
    body = rng.integers(FIRST_TEXT_ID, vocab_size - CHATGLM_TOKENS, max(1, prompt - len(prefix)))
    return [*prefix, *body.tolist()], min(dist.reply_max, max(dist.reply_min, reply))


def text_rows(dist: ChatLike, tokenizer: PreTrainedTokenizerBase, indices: range) -> list[dict]:
    """Requests ``indices`` of the stream as the serving load and the batch send them: text and reply length."""
    prefix = tuple(tokenizer("")["input_ids"])
    rows = []
    for i in indices:
        ids, reply = token_request(dist, len(tokenizer), i, prefix)
        rows.append({"prompt": tokenizer.decode(ids[len(prefix) :]), "output_tokens": reply})
    return rows
