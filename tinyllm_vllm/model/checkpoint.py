"""Turn a TinyLLM checkpoint into a directory that vLLM and transformers load faithfully.

SRC is a directory laid out like the published repo (``sources`` downloads one from the Hugging Face
hub or ModelScope). OUT gets config.json without
remote code, the weights (hard-linked or copied, never rewritten), a fast tokenizer with the training
chat template, generation_config.json and a manifest. OUT is written to a temporary sibling and
renamed into place, so it is never half-written; re-running with the same inputs is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError

from tinyllm_vllm import __version__
from tinyllm_vllm.errors import CheckpointError, ConfigError
from tinyllm_vllm.model.config import TinyllmConfig, expected_tensor_names
from tinyllm_vllm.model.tokenizer import (
    CHATGLM_EXTRA_TOKENS,
    EOS_ID,
    PAD_ID,
    stop_token_ids,
    write_tokenizer,
)

MANIFEST = "tinyllm_manifest.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- validation --------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict:
    """Parse a safetensors header, checking that every tensor lies inside the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header length beyond end of file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
    data = size - 8 - n
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if end > data:
        raise CheckpointError(f"{path}: truncated: tensors need {end} bytes of data, the file has {data}")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def weight_summary(path: Path) -> tuple[dict[str, list[int]], str]:
    """Tensor shapes and the weights' dtype, read from the file rather than trusted from config.json."""
    if path.suffix == ".safetensors":
        header = read_safetensors_header(path)
        shapes = {k: v["shape"] for k, v in header.items()}
        dtypes = {v["dtype"] for v in header.values()}
        dtype = SAFETENSORS_DTYPES.get(next(iter(dtypes)), "") if len(dtypes) == 1 else ""
    else:
        import torch

        try:
            sd = torch.load(path, map_location="meta", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot be read as a PyTorch state dict ({e})") from e
        shapes = {k: list(v.shape) for k, v in sd.items()}
        dtypes = {str(v.dtype).removeprefix("torch.") for v in sd.values()}
        dtype = next(iter(dtypes)) if len(dtypes) == 1 else ""
    if not dtype:
        raise CheckpointError(f"{path}: tensors of mixed or unsupported dtypes ({sorted(dtypes)})")
    return shapes, dtype


def expected_shapes(cfg: TinyllmConfig) -> dict[str, list[int]]:
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    shapes = {}
    for name in expected_tensor_names(cfg):
        leaf = name.split(".")[-2] + "." + name.split(".")[-1]
        shapes[name] = {
            "embed_tokens.weight": [v, h],
            "lm_head.weight": [v, h],
            "norm.weight": [h],
            "input_layernorm.weight": [h],
            "post_attention_layernorm.weight": [h],
            "q_proj.weight": [h, h],
            "q_proj.bias": [h],
            "k_proj.weight": [kv, h],
            "k_proj.bias": [kv],
            "v_proj.weight": [kv, h],
            "v_proj.bias": [kv],
            "o_proj.weight": [h, h],
            "gate_proj.weight": [i, h],
            "up_proj.weight": [i, h],
            "down_proj.weight": [h, i],
        }[leaf]
    return shapes


def inspect_source(src_dir: Path) -> dict:
    """Validate a published-layout directory; return what prepare needs. Raises CheckpointError."""
    cfg_path = src_dir / "config.json"
    for required in ("config.json", "tokenizer.model"):
        if not (src_dir / required).is_file():
            raise CheckpointError(
                f"{src_dir / required}: missing (a TinyLLM checkpoint needs "
                f"config.json, model.safetensors or pytorch_model.bin, tokenizer.model)"
            )
    weights = next((src_dir / w for w in WEIGHT_FILES if (src_dir / w).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{src_dir}: no weights (expected {' or '.join(WEIGHT_FILES)})")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    if raw.get("model_type") != "tinyllm":
        raise CheckpointError(f"{cfg_path}: field 'model_type' is {raw.get('model_type')!r}, expected 'tinyllm'")
    fields = {k: v for k, v in raw.items() if k not in ("auto_map", "architectures", "transformers_version")}
    try:
        cfg = TinyllmConfig(**fields)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    except (TypeError, ValueError, StrictDataclassError) as e:
        # e.g. "Validation error for field 'hidden_size': expected int, got str"
        raise CheckpointError(f"{cfg_path}: invalid field: {' '.join(str(e).split())}") from e

    import sentencepiece as spm

    try:
        pieces = spm.SentencePieceProcessor(model_file=str(src_dir / "tokenizer.model")).get_piece_size()
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"{src_dir / 'tokenizer.model'}: not a SentencePiece model ({e})") from e
    if pieces + len(CHATGLM_EXTRA_TOKENS) != cfg.vocab_size:
        raise CheckpointError(
            f"{cfg_path}: field 'vocab_size' is {cfg.vocab_size} but tokenizer.model has {pieces} pieces "
            f"+ {len(CHATGLM_EXTRA_TOKENS)} ChatGLM tokens = {pieces + len(CHATGLM_EXTRA_TOKENS)}"
        )

    shapes, dtype = weight_summary(weights)
    for name, shape in expected_shapes(cfg).items():
        if name not in shapes:
            raise CheckpointError(f"{weights}: missing tensor {name!r}")
        if list(shapes[name]) != shape:
            raise CheckpointError(f"{weights}: tensor {name!r} has shape {shapes[name]}, config.json implies {shape}")
    return {"config": cfg, "raw_config": raw, "weights": weights, "dtype": dtype}


# --- prepare -----------------------------------------------------------------------------------


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def manifest(path: str | Path) -> dict:
    """What a prepared checkpoint is: its source, revision, dtype, and whether it is the demo model
    (``demo``) or has random weights (``random_weights``: its text is noise)."""
    return json.loads((Path(path) / MANIFEST).read_text())


def _place(src: Path, dst: Path) -> None:
    """Hard-link when on the same filesystem (no copy, no rewrite), else copy."""
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


def prepare_checkpoint(
    src: str | Path, out: str | Path, source: str | None = None, revision: str | None = None
) -> Path:
    """Prepare the directory SRC into OUT (see module docstring); ``source``/``revision`` say where SRC came
    from (recorded in the manifest). Returns OUT. Raises CheckpointError on bad input."""
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_prepared(out))):
        raise CheckpointError(f"{out}: exists and is not a prepared TinyLLM checkpoint; not overwriting it")
    src_dir = Path(src).expanduser()
    if not src_dir.is_dir():
        raise CheckpointError(f"{src_dir}: no such directory (expected a TinyLLM checkpoint directory)")
    rev = revision
    info = inspect_source(src_dir)
    inputs = {p.name: sha256(p) for p in (src_dir / "config.json", info["weights"], src_dir / "tokenizer.model")}
    gen_src = src_dir / "generation_config.json"
    if gen_src.is_file():
        inputs[gen_src.name] = sha256(gen_src)
    manifest = {
        "tinyllm_vllm_version": __version__,
        "source": source or str(src),
        "revision": rev,
        "inputs": inputs,
        "random_weights": bool(info["raw_config"].get("tinyllm_random_weights", False)),
        "demo": bool(info["raw_config"].get("tinyllm_demo", False)),
        "dtype": info["dtype"],
    }
    with exclusive(out):
        if is_prepared(out):
            old = json.loads((out / MANIFEST).read_text())
            if {k: old.get(k) for k in manifest} == manifest:
                return out  # same inputs, same kit version: nothing to do
        return _write_prepared(src_dir, out, info, manifest)


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold a lock on OUT's parent directory (flock; no file is left) while OUT is checked and written: two
    processes preparing the same directory at once (two notebooks started together in a fresh kit home) take
    turns, and the second finds the first one's result instead of colliding with it."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _write_prepared(src_dir: Path, out: Path, info: dict, manifest: dict) -> Path:
    gen_src = src_dir / "generation_config.json"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cfg: TinyllmConfig = info["config"]
        config = {k: v for k, v in info["raw_config"].items() if k not in ("auto_map", "torch_dtype", "dtype")}
        config.update(
            architectures=["TinyllmForCausalLM"],
            model_type="tinyllm",
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            torch_dtype=info["dtype"],
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        _place(info["weights"], tmp / info["weights"].name)
        num_pieces = write_tokenizer(src_dir / "tokenizer.model", tmp, model_max_length=cfg.max_position_embeddings)
        gen = json.loads(gen_src.read_text()) if gen_src.is_file() else {}
        # The original README's stop ids (151329, ...) belong to GLM-4; TinyLLM stops on eos and role tokens.
        gen.update(eos_token_id=stop_token_ids(num_pieces), pad_token_id=PAD_ID)
        gen.pop("bos_token_id", None)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
