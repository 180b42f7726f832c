"""Offline generation with ``vllm.LLM``: the original README's ``get_completion``, done right.

Prompts for chat go through the prepared checkpoint's training-format template (``LLM.chat``);
stop ids (eos and the role tokens) come from the prepared generation_config.json, which vLLM applies
to every request. Results are plain rows a notebook can show as a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .settings import Settings


@dataclass
class Generation:
    prompt: str
    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str


def load_llm(model_dir: str | Path, settings: Settings | None = None, **overrides):
    """Start an in-process vLLM engine on a prepared checkpoint (the plugin provides the model)."""
    from vllm import LLM

    settings = settings or Settings.from_env()
    args = settings.engine_args() | overrides
    return LLM(str(model_dir), **args)


def sampling(max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             **kwargs):
    """``SamplingParams``: greedy by default; pass temperature/top_p/seed to sample reproducibly."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, **kwargs)


def _rows(prompts: list[str], outputs) -> list[Generation]:
    return [Generation(p, o.outputs[0].text, len(o.prompt_token_ids), len(o.outputs[0].token_ids),
                       str(o.outputs[0].finish_reason)) for p, o in zip(prompts, outputs)]


def complete(llm, prompts: list[str], params=None) -> list[Generation]:
    """Raw completion of each prompt (the tokenizer prepends [gMASK]sop), batched in one call."""
    return _rows(prompts, llm.generate(prompts, params or sampling(), use_tqdm=False))


def chat(llm, questions: list[str], params=None, system: str | None = None) -> list[Generation]:
    """One chat turn per question in TinyLLM's training format, batched in one call."""
    head = [{"role": "system", "content": system}] if system else []
    conversations = [head + [{"role": "user", "content": q}] for q in questions]
    return _rows(questions, llm.chat(conversations, params or sampling(), use_tqdm=False))

