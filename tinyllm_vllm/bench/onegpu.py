"""``tinyllm-vllm bench one-gpu``: how many useful tokens one GPU makes at steady state -> one_gpu.json

In one run on one machine, on one chat-like request stream (one seed), every figure timed by the
measurement rule (``rule``: at least 20 s and 8x the requests in flight, warm-up on other requests):

* offline: the plan's N engines side by side (the ``mp`` executor, each on 1/N of the memory, timed
  together, every repeat): the headline;
* the kit's batch path: ``generate --input`` on ``batch_rows`` rows of the same stream with those N
  engines, against the headline;
* serving through one endpoint: the kit's default deployment (``serve --replicas auto``: the replicas
  behind vllm-router), warmed on other requests, then loaded at each level by client processes started
  behind a barrier (``load``), each repeat on its own requests; vLLM's ``/metrics`` of every replica are
  read during each level;
* then the baselines, one run each (last, so that a run cut short keeps every headline): one engine with
  vLLM's defaults, vLLM's own Qwen2 class on the same weights, transformers at its best (static cache with
  compile at the given batch size, static batches one after another), and the scan's other engine counts
  (a count that beats the plan's is named).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tinyllm_vllm.bench import load
from tinyllm_vllm.bench.compare import machine
from tinyllm_vllm.bench.engines import EngineSpec, run_engine
from tinyllm_vllm.bench.sharing import combined_steady, run_engines_sharing_gpu
from tinyllm_vllm.bench.workload import ChatLike, describe, text_rows
from tinyllm_vllm.rule import Rule, headline, median_spread
from tinyllm_vllm.runtime.plan import plan
from tinyllm_vllm.settings import Settings


def _stream(dist: ChatLike) -> dict:
    return {k: v for k, v in asdict(dist).items() if k != "name"}


def one_gpu(
    model: str | Path,
    settings: Settings,
    out_dir: Path,
    rule: Rule,
    dist: ChatLike,
    scan: tuple[int, ...] = (2, 4, 8),
    batch_rows: int = 65536,
    serve_requests: int = 16384,
    levels: tuple[int, ...] = (1024, 2048),
    hf_batch_sizes: tuple[int, ...] = (1024,),
    progress: Callable[[str], Any] = print,
    save: Callable[[dict], Any] | None = None,
) -> dict:
    from transformers import AutoTokenizer

    import tinyllm_vllm.model.config  # noqa: F401  (registers model_type tinyllm)

    gpu = plan(settings, "auto", offline=True)
    tok = AutoTokenizer.from_pretrained(str(model))
    spec = EngineSpec(str(model), "", engine_args=settings.engine_options(), rule=asdict(rule), stream=_stream(dist))
    result: dict[str, Any] = {
        "kind": "one-gpu",
        "machine": machine(),
        "workload": describe(dist),
        "plan": gpu.why,
        "method": rule.describe(),
    }
    runs: dict[str, Any] = {}
    result["runs"] = runs
    t0 = time.monotonic()

    def step(name: str, r: dict) -> dict:
        if "useful_tok_s" in r:
            lo, hi = r["spread"]
            said = f"{r['useful_tok_s']:,.0f} useful tok/s [{lo:,.0f}, {hi:,.0f}], runs of >= {r['seconds']:.0f} s"
        else:
            said = f"failed: {str(r.get('error'))[:300]}"
        progress(f"[one-gpu] {name}: {said} ({time.monotonic() - t0:.0f} s)")
        if save:
            save(result)
        return r

    def engine(s: EngineSpec, timeout: float = 1800) -> dict:
        r = run_engine(s, timeout=timeout)
        if "error" in r:
            return r
        if s.engine.startswith("transformers"):
            return r | headline(r["runs"])
        return combined_steady([r], s.rule) | {"engines": 1}

    offline = runs["offline"] = {}
    mp = replace(spec, engine_args=spec.engine_args | gpu.engine_options)
    scanned = runs["plan_scan"] = []

    def side_by_side(k: int, s: EngineSpec) -> dict:
        try:
            r = run_engines_sharing_gpu(s, k, settings)
        except RuntimeError as e:
            r = {"error": str(e)[-500:]}
        scanned.append({"engines": k, "engine_options": gpu.engine_options} | step(f"scan: {k} engines, mp", r))
        return r

    # the plan's own count with every repeat: it is the headline, and the batch and the serving use it
    best_k = gpu.engines
    best = side_by_side(best_k, mp)
    if "useful_tok_s" in best:
        best |= {"engine_options": gpu.engine_options}
    offline["best"] = step(f"best: the plan's {best_k} engines side by side", best)
    runs["batch"] = batch_run(model, settings, out_dir, dist, tok, batch_rows, best_k, progress)
    if "useful_tok_s" in runs["batch"]:
        progress(f"[one-gpu] batch: {runs['batch']['useful_tok_s']:,.0f} tok/s ({time.monotonic() - t0:.0f} s)")
    if save:
        save(result)
    try:
        runs["serving"] = _serving(model, settings, dist, tok, rule, serve_requests, levels, progress)
    except Exception as e:  # the offline figures stand: say what failed
        runs["serving"] = {"error": f"{type(e).__name__}: {e}", "levels": []}
    if save:
        save(result)
    # the baselines, one run each by the rule, after every headline: a run cut short keeps the headlines.
    # One engine with vLLM's defaults is what the plan is read against
    single = replace(spec, rule=asdict(replace(rule, repeats=1)))
    offline["single_engine"] = step("one engine, vLLM defaults (one run)", engine(single))
    # a comparison of two model classes on the same weights
    qwen2 = replace(spec, engine="qwen2", rule=asdict(replace(rule, repeats=1)))
    offline["qwen2"] = step("vLLM's Qwen2 class (one run)", engine(qwen2))
    hf = replace(spec, engine="transformers_static", hf_batch_sizes=hf_batch_sizes, hf_caches=("static",))
    hf = replace(hf, rule=asdict(replace(rule, repeats=1)))  # the baseline, as the scan: one run by the rule
    offline["transformers"] = step("transformers at its best (one run)", engine(hf, timeout=1800))
    # the other counts last, one run each: a run cut short still has every headline; a count that beats the
    # plan's in its one run is named in the summary (``scan_winner``), for the plan to be measured again
    for k in scan:
        if k != best_k:
            side_by_side(k, replace(mp, rule=asdict(replace(rule, repeats=1))))
    return summarized(result)


def batch_run(
    model: str | Path,
    settings: Settings,
    out_dir: Path,
    dist: ChatLike,
    tok: Any,
    rows: int,
    engines: int,
    progress: Callable[[str], Any],
    ray: bool = False,
) -> dict:
    """``generate --input`` (``ray``: with ``--ray``, on Ray Data LLM) on ``rows`` rows of the stream, each with
    its own reply length (``max_tokens``, ``ignore_eos``): completed as text (``--raw``), written in input order."""
    from tinyllm_vllm.batch import BatchJob, run_batch
    from tinyllm_vllm.ray_batch import run_ray_batch

    work = out_dir / ("ray-batch" if ray else "batch")
    work.mkdir(parents=True, exist_ok=True)
    path = work / "in.jsonl"
    with open(path, "w") as f:
        for i, r in enumerate(text_rows(dist, tok, range(rows))):
            line = {"id": i, "prompt": r["prompt"], "max_tokens": r["output_tokens"], "ignore_eos": True}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    out = work / "out.jsonl"
    out.unlink(missing_ok=True)
    job = BatchJob(path, out, engines=str(engines), raw=True)
    label = "ray batch" if ray else "batch"
    try:
        go = run_ray_batch if ray else run_batch
        summary = go(Path(model), job, settings, echo=lambda line: progress(f"[one-gpu] {label}: {line}"))
    except Exception as e:  # the other figures stand: say what failed
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        for f in (path, out):
            f.unlink(missing_ok=True)
    command = f"tinyllm-vllm generate --input ROWS.jsonl --output OUT.jsonl --raw --engines {engines}"
    return summary | {"command": command + (" --ray" if ray else "")}


def _serving(
    model: str | Path,
    settings: Settings,
    dist: ChatLike,
    tok: Any,
    rule: Rule,
    requests: int,
    levels: tuple[int, ...],
    progress: Callable[[str], Any],
) -> dict:
    from tinyllm_vllm.runtime.deploy import Replicas

    with Replicas(model, "auto", settings=settings, echo=progress) as fleet:
        first = fleet.first_answer_s
        fleet.wait_all()  # measured at full capacity
        out = {"replicas": len(fleet.servers), "api_server_count": fleet.plan.api_server_count, "plan": fleet.plan.why}
        # the start as a user meets it, in a home the offline engines have compiled in
        out |= {"first_answer_s": round(first, 1), "all_replicas_s": round(fleet.all_ready_s, 1)}
        progress(f"[one-gpu] serving: first answer after {first:.0f} s, all replicas after {fleet.all_ready_s:.0f} s")
        urls = [s.url for s in fleet.servers]
        return out | serve_levels(fleet, dist, tok, rule, requests, levels, progress, metrics_urls=urls)


def serve_levels(
    endpoint: Any,
    dist: ChatLike,
    tok: Any,
    rule: Rule,
    requests: int,
    levels: tuple[int, ...],
    progress: Callable[[str], Any],
    metrics_urls: list[str] = (),
    label: str = "one-gpu: serving",
) -> dict:
    """Load one endpoint (``url``, ``served_model_name``) by the rule: warmed on other requests, then at each
    level ``rule.repeats`` runs, each on its own ``requests`` of the stream; vLLM's ``/metrics`` read from
    ``metrics_urls`` (the replicas) during each run."""
    clients = load.clients_for(max(levels))
    warm = text_rows(replace(dist, seed=dist.seed + 1), tok, range(2 * max(levels)))
    out: dict[str, Any] = {"clients": clients, "requests_per_run": requests, "levels": []}
    name = endpoint.served_model_name
    load.run_load(endpoint.url, name, warm, min(max(levels), len(warm)), clients)  # warm-up: other requests
    for c in levels:
        runs = []
        for j in range(rule.repeats):
            rows = text_rows(dist, tok, range(j * requests, (j + 1) * requests))
            with load.Metrics(list(metrics_urls)) as metrics:
                level = load.measured_level(endpoint.url, name, rows, c, clients)
            runs.append(level | {"metrics": metrics.summary()})
            progress(
                f"[{label}] {c} in flight, run {j + 1}: {level['steady_tok_s']:,.0f} output tok/s "
                f"steady ({level['output_tok_s']:,.0f} whole run, {level['duration_s']:.0f} s), "
                f"{level['failed']} failed, overlap {level['client_overlap']:.0%}"
            )
        out["levels"].append({"concurrency": c, "runs": runs})
    return out


def best_level(serving: dict) -> dict | None:
    """The headline of the valid level (clients ran together) with the highest median steady rate."""
    heads = [level_headline(lv) for lv in serving.get("levels", [])]
    return max((h for h in heads if h["valid"]), key=lambda h: h["tok_s"], default=None)


def summarized(result: dict) -> dict:
    """The result with its headline keys at the top, rebuilt from its runs (``tinyllm-vllm bench report``)."""
    head = {k: result[k] for k in ("kind", "machine", "workload", "plan", "method")}
    return head | summary(result) | {"runs": result["runs"]}


def level_headline(level: dict) -> dict:
    runs = level["runs"]
    ms = median_spread([r["steady_tok_s"] for r in runs])
    return {
        "concurrency": level["concurrency"],
        "tok_s": ms["median"],
        "spread": ms["spread"],
        "seconds": min(r["duration_s"] for r in runs),
        "requests": min(r["requests"] for r in runs),
        "ttft_ms_p99": statistics.median(r["ttft_ms_p99"] or 0 for r in runs),
        "valid": all(r["valid"] for r in runs),
    }


def summary(r: dict) -> dict:
    """The keys the README and notebook 04 quote, from one run."""
    off, batch = r["runs"]["offline"], r["runs"].get("batch", {})
    srv = r["runs"].get("serving") or {"levels": []}
    best, hf = off["best"], off.get("transformers", {})
    busy = [x["gpu_busy"] for x in best.get("runs", []) if x.get("gpu_busy") is not None]
    levels = [level_headline(lv) for lv in srv["levels"]]
    top = best_level(srv)
    all_runs = [x for lv in srv["levels"] for x in lv["runs"]]
    best_tok = best.get("useful_tok_s")
    missing = [k for k in ("batch", "serving") if k not in r["runs"]]
    missing += [k for k in ("single_engine", "qwen2", "transformers") if k not in off]
    scan = [x for x in r["runs"]["plan_scan"] if "useful_tok_s" in x]
    single = [off["single_engine"] | {"engine_options": "vLLM's defaults"}] if "single_engine" in off else []
    winner = max(scan, key=lambda x: x["useful_tok_s"], default={}).get("engines")
    return {
        # a run stopped early keeps what it measured and says what it lacks
        "complete": not missing,
        "missing": missing,
        "best_offline": {
            "engines": best.get("engines"),
            "engine_options": best.get("engine_options"),
            "useful_tok_s": best_tok,
            "spread": best.get("spread"),
            "seconds": best.get("seconds"),
            "requests": best.get("requests"),
            "gpu_busy": statistics.median(busy) if busy else None,
            "scan_winner": winner,
        },
        "batch": {
            "rows": batch.get("rows"),
            "engines": batch.get("engines"),
            "useful_tok_s": batch.get("useful_tok_s"),
            "seconds": batch.get("generate_s"),
            "seconds_in_all": batch.get("seconds"),
            "over_best_offline": batch["useful_tok_s"] / best_tok if batch.get("useful_tok_s") and best_tok else None,
        },
        "serving": {
            "best": (
                {"replicas": srv.get("replicas"), "api_server_count": srv.get("api_server_count")}
                | {k: top[k] for k in ("concurrency", "tok_s", "spread", "seconds", "requests", "ttft_ms_p99")}
                if top
                else None
            ),
            "levels": levels,
            "failed": sum(x["failed"] for x in all_runs),
            "client_overlap_min": min((x["client_overlap"] for x in all_runs), default=None),
        },
        "single_engine_useful_tok_s": off.get("single_engine", {}).get("useful_tok_s"),
        "qwen2_useful_tok_s": off.get("qwen2", {}).get("useful_tok_s"),
        "transformers_best_useful_tok_s": hf.get("useful_tok_s"),
        "transformers_best_settings": {
            "cache": hf.get("cache"),
            "batch_size": hf.get("batch_size"),
        },
        # the single engine is the scan's first point (vLLM's defaults, no mp)
        "plan_scan": [
            {
                k: x[k]
                for k in (
                    "engines",
                    "engine_options",
                    "useful_tok_s",
                    "spread",
                    "seconds",
                    "requests",
                    "repeats",
                    "error",
                )
                if k in x
            }
            | {"gpu_busy": x["runs"][0].get("gpu_busy") if x.get("runs") else None}
            for x in single + r["runs"]["plan_scan"]
        ],
    }
