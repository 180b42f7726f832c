"""Turn any TinyLLM checkpoint into a directory that vLLM and transformers load faithfully.

SRC may be a local directory laid out like the published repo, a Hugging Face id
(``wdndev/tiny_llm_sft_92m``) or ``modelscope:wdn/tiny_llm_sft_92m``. OUT gets config.json without
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
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError

from .config import TinyllmConfig, TinyllmConfigError, expected_tensor_names
from .tokenizer import CHATGLM_EXTRA_TOKENS, EOS_ID, PAD_ID, stop_token_ids, write_tokenizer

PUBLISHED_ID = "wdndev/tiny_llm_sft_92m"
MANIFEST = "tinyllm_manifest.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# What a published-layout source must hold; the remote-code .py files are ignored on purpose.
HUB_PATTERNS = ["config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin",
                "tokenizer.model", "tokenizer_config.json"]
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class CheckpointError(ValueError):
    """A source checkpoint cannot be prepared; the message names the file or field."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- sources -----------------------------------------------------------------------------------

def fetch(src: str, revision: str | None = None) -> tuple[Path, str | None]:
    """Return a local directory for SRC (downloading if needed) and the revision it came from."""
    if src.startswith("modelscope:"):
        return _fetch_modelscope(src.removeprefix("modelscope:"), revision)
    local = Path(src).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{local}: not a directory (expected a TinyLLM checkpoint directory)")
        return local, revision
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise CheckpointError(f"{src}: no such directory, and not a hub id of the form 'owner/name'")
    return _fetch_hub(src, revision)


def _fetch_hub(repo_id: str, revision: str | None) -> tuple[Path, str | None]:
    """Download from the Hugging Face hub (progress bars, cache and HF_HUB_OFFLINE as huggingface_hub does)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{repo_id}: cannot download from the Hugging Face hub and no cached copy was found "
            f"(offline, or the hub is unreachable). Use a local directory, or `tinyllm-vllm demo-model`. "
            f"Cause: {str(e).splitlines()[0]}") from e
    except HfHubHTTPError as e:
        raise CheckpointError(f"{repo_id}: the hub refused the download: {str(e).splitlines()[0]}") from e
    return path, path.name  # snapshot folders are named after the commit


def _fetch_modelscope(model_id: str, revision: str | None) -> tuple[Path, str | None]:
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        raise CheckpointError("modelscope:{0} needs the optional modelscope package: "
                              "pip install 'tinyllm-vllm[modelscope]'".format(model_id)) from e
    # HF_HUB_OFFLINE=1 means offline for both hubs: use the local cache, contact no host
    kwargs = {"allow_patterns": HUB_PATTERNS, "local_files_only": os.environ.get("HF_HUB_OFFLINE") == "1"}
    if revision:
        kwargs["revision"] = revision
    try:
        path = Path(snapshot_download(model_id, **kwargs))
    except Exception as e:  # modelscope raises plain exceptions of several kinds
        raise CheckpointError(f"modelscope:{model_id}: download failed: {str(e).splitlines()[0]}") from e
    return path, revision


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
            "embed_tokens.weight": [v, h], "lm_head.weight": [v, h], "norm.weight": [h],
            "input_layernorm.weight": [h], "post_attention_layernorm.weight": [h],
            "q_proj.weight": [h, h], "q_proj.bias": [h], "k_proj.weight": [kv, h], "k_proj.bias": [kv],
            "v_proj.weight": [kv, h], "v_proj.bias": [kv], "o_proj.weight": [h, h],
            "gate_proj.weight": [i, h], "up_proj.weight": [i, h], "down_proj.weight": [h, i],
        }[leaf]
    return shapes


def inspect_source(src_dir: Path) -> dict:
    """Validate a published-layout directory; return what prepare needs. Raises CheckpointError."""
    cfg_path = src_dir / "config.json"
    for required in ("config.json", "tokenizer.model"):
        if not (src_dir / required).is_file():
            raise CheckpointError(f"{src_dir / required}: missing (a TinyLLM checkpoint needs "
                                  f"config.json, model.safetensors or pytorch_model.bin, tokenizer.model)")
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
    except TinyllmConfigError as e:
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
            f"+ {len(CHATGLM_EXTRA_TOKENS)} ChatGLM tokens = {pieces + len(CHATGLM_EXTRA_TOKENS)}")

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


def _place(src: Path, dst: Path) -> None:
    """Hard-link when on the same filesystem (no copy, no rewrite), else copy."""
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


def prepare_checkpoint(src: str | Path, out: str | Path, revision: str | None = None) -> Path:
    """Prepare SRC into OUT (see module docstring). Returns OUT. Raises CheckpointError on bad input."""
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_prepared(out))):
        raise CheckpointError(f"{out}: exists and is not a prepared TinyLLM checkpoint; not overwriting it")
    src_dir, rev = fetch(str(src), revision)
    info = inspect_source(src_dir)
    inputs = {p.name: sha256(p) for p in (src_dir / "config.json", info["weights"], src_dir / "tokenizer.model")}
    gen_src = src_dir / "generation_config.json"
    if gen_src.is_file():
        inputs[gen_src.name] = sha256(gen_src)
    manifest = {"tinyllm_vllm_version": _version(), "source": str(src), "revision": rev, "inputs": inputs,
                "random_weights": bool(info["raw_config"].get("tinyllm_random_weights", False)),
                "dtype": info["dtype"]}
    if is_prepared(out):
        old = json.loads((out / MANIFEST).read_text())
        if {k: old.get(k) for k in manifest} == manifest:
            return out  # same inputs, same kit version: nothing to do

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cfg: TinyllmConfig = info["config"]
        config = {k: v for k, v in info["raw_config"].items() if k not in ("auto_map", "torch_dtype", "dtype")}
        config.update(architectures=["TinyllmForCausalLM"], model_type="tinyllm", eos_token_id=EOS_ID,
                      pad_token_id=PAD_ID, torch_dtype=info["dtype"])
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


def _version() -> str:
    from . import __version__

    return __version__


# --- the embedded demo model ---------------------------------------------------------------------

DEMO_CORPUS = Path(__file__).with_name("demo_corpus.txt")


def demo_model(out: str | Path, layers: int = 2, hidden: int = 128, heads: int = 2, intermediate: int = 352,
               seed: int = 0, spm_model: str | Path | None = None) -> Path:
    """Write a small random-weight TinyLLM laid out like the published repo (so it goes through prepare).

    Head size is hidden/heads = 64 (a size vLLM's CPU attention supports). The tokenizer is a small
    SentencePiece BPE model trained here on an embedded corpus with the ChatGLM3 options (byte
    fallback, dummy prefix, identity normalizer), followed by the same 9 ChatGLM tokens. The weights
    are random: the text it generates is noise, and the manifest says so. Pass ``spm_model`` (the real
    ChatGLM3 tokenizer.model) and layers=8, hidden=512, heads=8, intermediate=1408 for a random model of
    the published 92M shape (the benchmarks use that).
    """
    import sentencepiece as spm
    import torch
    from safetensors.torch import save_file

    out = Path(out).expanduser().absolute()
    if out.exists() and any(out.iterdir()):
        if (out / "config.json").is_file() and json.loads((out / "config.json").read_text()).get(
                "tinyllm_random_weights"):
            return out
        raise CheckpointError(f"{out}: exists and is not a demo model; not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if spm_model:
            shutil.copy(spm_model, tmp / "tokenizer.model")
        else:
            spm.SentencePieceTrainer.train(
                input=str(DEMO_CORPUS), model_prefix=str(tmp / "tokenizer"), model_type="bpe", vocab_size=1200,
                hard_vocab_limit=False, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
                remove_extra_whitespaces=False, normalization_rule_name="identity", character_coverage=1.0,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
            (tmp / "tokenizer.vocab").unlink()
        pieces = spm.SentencePieceProcessor(model_file=str(tmp / "tokenizer.model")).get_piece_size()
        vocab = pieces + len(CHATGLM_EXTRA_TOKENS)
        config = {
            "architectures": ["TinyllmForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_tinyllm.TinyllmConfig",
                         "AutoModelForCausalLM": "modeling_tinyllm.TinyllmForCausalLM"},
            "model_type": "tinyllm", "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": 1024, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
            "vocab_size": vocab, "tie_word_embeddings": False, "hidden_act": "silu",
            "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
            "torch_dtype": "bfloat16", "tinyllm_random_weights": True,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        cfg = TinyllmConfig(**{k: v for k, v in config.items() if k not in ("auto_map", "architectures")})
        gen = torch.Generator().manual_seed(seed)
        tensors = {}
        for name, shape in expected_shapes(cfg).items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape)
            else:
                tensors[name] = torch.randn(shape, generator=gen) * 0.02
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLMTokenizer"}) + "\n")
        (tmp / "README.md").write_text("Random-weight TinyLLM built by `tinyllm-vllm demo-model` for machines "
                                       "without network. Its output is noise; use it to test the pipeline.\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- which model a run uses ----------------------------------------------------------------------

def ensure_model(model: str, home: str | Path) -> tuple[Path, str]:
    """Resolve a settings ``model`` value to a prepared checkpoint directory, and say what it is.

    ``demo`` builds the embedded random-weight model; ``auto`` tries the published model and falls
    back to the demo model when it cannot be downloaded (said plainly in the returned note); a
    prepared directory is used as is; anything else (hub id, modelscope:ID, directory) is prepared.
    """
    home = Path(home).expanduser()
    if model == "demo":
        return prepare_checkpoint(demo_model(home / "demo-src"), home / "demo"), (
            "the embedded demo model (random weights: its text is noise)")
    if model == "auto":
        try:
            return ensure_model(PUBLISHED_ID, home)
        except CheckpointError as e:
            path, _ = ensure_model("demo", home)
            return path, (f"the embedded demo model (random weights: its text is noise), because "
                          f"{PUBLISHED_ID} could not be prepared: {e}")
    if is_prepared(model):
        return Path(model).expanduser().absolute(), f"the prepared checkpoint {model}"
    name = model.removeprefix("modelscope:").rstrip("/").split("/")[-1]
    return prepare_checkpoint(model, home / name), f"{model} (prepared into {home / name})"
