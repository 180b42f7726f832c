"""Where a TinyLLM checkpoint comes from: a directory, the Hugging Face hub, ModelScope, or the demo model.

``ensure_model`` turns a ``TINYLLM_MODEL`` value into a prepared checkpoint under the kit's home and
says in a note which source it used and why it skipped the others. ``auto`` tries the hub (honouring
``HF_ENDPOINT`` mirrors and ``HF_HUB_OFFLINE`` as huggingface_hub does), then ModelScope (where the
``modelscope`` package is installed; ``VLLM_USE_MODELSCOPE=True``, the original recipe's switch, puts
it first), then falls back to the embedded demo model. Reaching a hub is bounded by ``PROBE_S``; a
cached copy is used when the hub cannot be reached.
"""

from __future__ import annotations

import os
from pathlib import Path

from tinyllm_vllm.errors import CheckpointError
from tinyllm_vllm.model.checkpoint import is_prepared, prepare_checkpoint

PUBLISHED_ID = "wdndev/tiny_llm_sft_92m"
MODELSCOPE_ID = "wdn/tiny_llm_sft_92m"
PROBE_S = 10.0
# What a published-layout source must hold; the remote-code .py files are ignored on purpose.
PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "tokenizer.model",
    "tokenizer_config.json",
]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def fetch(src: str, revision: str | None = None) -> tuple[Path, str | None]:
    """A local directory for SRC (downloading a hub or ``modelscope:`` id if needed), and its revision."""
    if src.startswith("modelscope:"):
        return fetch_modelscope(src.removeprefix("modelscope:"), revision)
    local = Path(src).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{local}: not a directory (expected a TinyLLM checkpoint directory)")
        return local, revision
    looks_local = src.startswith((".", "/", "~")) or src.count("/") != 1 or local.parent.is_dir()
    if looks_local:  # "models/tinyllm" where ./models exists is a mistyped path, not a hub id
        raise CheckpointError(f"{src}: no such directory (and not a hub id of the form 'owner/name')")
    return fetch_hub(src, revision)


def fetch_hub(repo_id: str, revision: str | None = None) -> tuple[Path, str | None]:
    """Download from the Hugging Face hub (its cache, progress bars, HF_ENDPOINT and HF_HUB_OFFLINE apply)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = _truthy("HF_HUB_OFFLINE")
    reachable = False
    if not offline:
        try:
            HfApi().model_info(repo_id, revision=revision, timeout=PROBE_S)
            reachable = True
        except HfHubHTTPError as e:
            raise CheckpointError(f"{repo_id}: the Hugging Face hub refused it: {_first_line(e)}") from e
        except Exception as e:  # connection errors of several kinds: fall back to the cache
            endpoint = os.environ.get("HF_ENDPOINT", "huggingface.co")
            why = f"the Hugging Face hub ({endpoint}) is unreachable: {_first_line(e)}"
    else:
        why = "HF_HUB_OFFLINE is set"
    try:
        path = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=PATTERNS, local_files_only=not reachable)
        )
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"{repo_id}: {why}, and no cached copy was found") from e
    except HfHubHTTPError as e:
        raise CheckpointError(f"{repo_id}: the Hugging Face hub refused the download: {_first_line(e)}") from e
    return path, path.name  # snapshot folders are named after the commit


def fetch_modelscope(model_id: str, revision: str | None = None) -> tuple[Path, str | None]:
    """Download from ModelScope (its cache applies; HF_HUB_OFFLINE=1 means offline for both hubs)."""
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        raise CheckpointError(
            f"modelscope:{model_id} needs the modelscope package: pip install 'tinyllm-vllm[modelscope]'"
        ) from e
    offline = _truthy("HF_HUB_OFFLINE")
    reachable = False
    if offline:
        why = "HF_HUB_OFFLINE is set"
    else:
        import httpx

        domain = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
        url = (domain if "://" in domain else f"https://{domain}") + f"/api/v1/models/{model_id}"
        try:
            reachable = httpx.get(url, timeout=PROBE_S).status_code < 500
        except httpx.HTTPError as e:
            why = f"ModelScope ({domain}) is unreachable: {_first_line(e)}"
        else:
            why = "ModelScope answered with a server error"
    kwargs = {"allow_patterns": PATTERNS, "local_files_only": not reachable}
    if revision:
        kwargs["revision"] = revision
    try:
        path = Path(snapshot_download(model_id, **kwargs))
    except Exception as e:  # modelscope raises plain exceptions of several kinds
        detail = _first_line(e) if reachable else f"{why}, and no cached copy was found"
        raise CheckpointError(f"modelscope:{model_id}: {detail}") from e
    return path, revision


def prepare(src: str, out: str | Path, revision: str | None = None) -> Path:
    """Fetch SRC (directory, hub id or ``modelscope:ID``) and prepare it into OUT."""
    src_dir, rev = fetch(src, revision)
    return prepare_checkpoint(src_dir, out, source=src, revision=rev)


def demo_note() -> str:
    from tinyllm_vllm.model.demo import corpus_answers

    return f"the demo model (it answers the {len(corpus_answers())} questions of its corpus, nothing else)"


def auto_order() -> list[str]:
    """The sources ``auto`` tries, in order."""
    order = [PUBLISHED_ID, f"modelscope:{MODELSCOPE_ID}"]
    return order[::-1] if _truthy("VLLM_USE_MODELSCOPE") else order


def _why(failures: list[str], verbose: bool) -> str:
    """Why the published sources were skipped: in full with ``verbose``, else one short clause."""
    if verbose:
        return "; ".join(failures)
    return "none could be had (TINYLLM_VERBOSE=1 says why)"


def ensure_model(model: str, home: str | Path, verbose: bool = False) -> tuple[Path, str]:
    """Resolve a ``TINYLLM_MODEL`` value to a prepared checkpoint directory, and say what it is in one short
    line (with ``verbose``, also why other sources were skipped)."""
    home = Path(home).expanduser()
    if model == "demo":
        from tinyllm_vllm.model.demo import demo_model

        return prepare_checkpoint(demo_model(home / "demo-src"), home / "demo", source="demo"), demo_note()
    if model == "auto":
        failures = []
        for src in auto_order():
            try:
                path, note = ensure_model(src, home)
            except CheckpointError as e:
                failures.append(str(e))
                continue
            skipped = f"; skipped: {'; '.join(failures)}" if failures and verbose else ""
            return path, note + skipped
        path, note = ensure_model("demo", home)
        return path, f"{note}; published copies: {_why(failures, verbose)}"
    if is_prepared(model):
        return Path(model).expanduser().absolute(), f"the prepared checkpoint {model}"
    name = model.removeprefix("modelscope:").rstrip("/").split("/")[-1]
    where = (
        "ModelScope"
        if model.startswith("modelscope:")
        else ("a local directory" if Path(model).expanduser().exists() else "the Hugging Face hub")
    )
    return prepare(model, home / name), f"{model} from {where} (prepared into {home / name})"
