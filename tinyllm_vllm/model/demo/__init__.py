"""The embedded demo model, and random-weight TinyLLMs of any shape for benchmarks.

``demo_model`` writes a small TinyLLM that was trained (by ``tools/train_demo_model.py``) on the
question/answer corpus beside this file, laid out like the published repository so it goes through
``prepare`` like the real model. It answers the walkthrough's questions in readable text and knows
nothing else. ``random_model`` writes random weights of any shape, for example the published 92M
shape with the real ChatGLM3 tokenizer: speed does not depend on the weights' values.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tinyllm_vllm.errors import CheckpointError

DEMO_DIR = Path(__file__).resolve().parent
CORPUS = DEMO_DIR / "corpus.jsonl"
# TinyLLM's architecture at a size that trains in minutes on a CPU; head size 64 like the 92M model
DEMO_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}
SHAPE_92M = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
DEMO_README = (
    "TinyLLM demo model built by tinyllm-vllm: trained on {n} question/answer pairs of the kit's "
    "corpus, it answers those questions and nothing else. Use it to learn and test the pipeline; "
    "use wdndev/tiny_llm_sft_92m for the real model.\n"
)


def read_corpus() -> list[dict]:
    """The demo corpus: ``{"q", "a"}`` chat pairs and ``{"text"}`` plain texts."""
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def corpus_answers() -> dict[str, str]:
    """Question -> answer for every chat pair the demo model was trained on."""
    return {r["q"]: r["a"] for r in read_corpus() if "q" in r}


def _published_config(shape: dict, vocab_size: int, **extra) -> dict:
    return {
        "architectures": ["TinyllmForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_tinyllm.TinyllmConfig",
            "AutoModelForCausalLM": "modeling_tinyllm.TinyllmForCausalLM",
        },
        "model_type": "tinyllm",
        **shape,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        **extra,
    }


KIT_MARKERS = ("tinyllm_demo", "tinyllm_random_weights")


def _write(out: str | Path, marker: str, fill: Callable[[Path], None], current: Callable[[Path], bool]) -> Path:
    """Write a published-layout model into OUT atomically. An OUT this kit built is kept when ``current``
    says it is up to date and rebuilt otherwise (an older kit's demo model); anything else is refused."""
    from tinyllm_vllm.model.checkpoint import exclusive

    out = Path(out).expanduser().absolute()
    with exclusive(out):
        return _write_locked(out, marker, fill, current)


def _write_locked(out: Path, marker: str, fill: Callable[[Path], None], current: Callable[[Path], bool]) -> Path:
    if out.exists() and any(out.iterdir()):
        cfg = out / "config.json"
        built = json.loads(cfg.read_text()) if cfg.is_file() else {}
        if not any(built.get(m) for m in KIT_MARKERS):
            raise CheckpointError(f"{out}: exists and is not a model built by tinyllm-vllm; not overwriting it")
        if built.get(marker) and current(out):
            return out
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill(tmp)
        (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLMTokenizer"}) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _same_file(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def demo_model(out: str | Path) -> Path:
    """Write the trained demo TinyLLM (published layout) into OUT; returns OUT."""
    import sentencepiece as spm

    from tinyllm_vllm.model.tokenizer import CHATGLM_EXTRA_TOKENS

    def fill(tmp: Path) -> None:
        shutil.copy(DEMO_DIR / "tokenizer.model", tmp / "tokenizer.model")
        shutil.copy(DEMO_DIR / "model.safetensors", tmp / "model.safetensors")
        pieces = spm.SentencePieceProcessor(model_file=str(tmp / "tokenizer.model")).get_piece_size()
        config = _published_config(DEMO_SHAPE, pieces + len(CHATGLM_EXTRA_TOKENS), tinyllm_demo=True)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(DEMO_README.format(n=len(corpus_answers())))

    def current(existing: Path) -> bool:
        return all(_same_file(existing / name, DEMO_DIR / name) for name in ("model.safetensors", "tokenizer.model"))

    return _write(out, "tinyllm_demo", fill, current)


def random_model(out: str | Path, spm_model: str | Path, shape: dict | None = None, seed: int = 0) -> Path:
    """Write a random-weight TinyLLM of ``shape`` (default: the published 92M) with ``spm_model`` as its
    tokenizer. Its text is noise; the benchmarks use it because speed does not depend on the weights."""
    import sentencepiece as spm
    import torch
    from safetensors.torch import save_file

    from tinyllm_vllm.model.checkpoint import expected_shapes
    from tinyllm_vllm.model.config import TinyllmConfig
    from tinyllm_vllm.model.tokenizer import CHATGLM_EXTRA_TOKENS

    def fill(tmp: Path) -> None:
        shutil.copy(spm_model, tmp / "tokenizer.model")
        pieces = spm.SentencePieceProcessor(model_file=str(tmp / "tokenizer.model")).get_piece_size()
        config = _published_config(shape or SHAPE_92M, pieces + len(CHATGLM_EXTRA_TOKENS), tinyllm_random_weights=True)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        cfg = TinyllmConfig(**{k: v for k, v in config.items() if k not in ("auto_map", "architectures")})
        gen = torch.Generator().manual_seed(seed)
        tensors = {
            name: torch.ones(s) if name.endswith("norm.weight") else torch.randn(s, generator=gen) * 0.02
            for name, s in expected_shapes(cfg).items()
        }
        save_file(
            {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (tmp / "README.md").write_text(
            "Random-weight TinyLLM built by tinyllm-vllm for benchmarks: its text is noise.\n"
        )

    def current(existing: Path) -> bool:
        return _same_file(existing / "tokenizer.model", Path(spm_model))

    return _write(out, "tinyllm_random_weights", fill, current)
