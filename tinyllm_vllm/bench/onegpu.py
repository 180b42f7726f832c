"""``tinyllm-vllm bench one-gpu``: does the kit's default deployment use the whole GPU? -> one_gpu.json

In one run on one machine, on one chat-like workload:

* offline: one engine with vLLM's defaults; one engine with the ``mp`` executor; the kit's one-GPU
  configuration (``plan.plan``: N engines side by side, each on 1/N of the requests and of the memory,
  timed together); vLLM's own Qwen2 class on the same weights; transformers at its best (dynamic and
  static cache with compile, at each batch size; the best one is then timed on every request).
  Every vLLM engine gets the same warm-up; GPU busy is sampled during each timed run.
* serving through one endpoint: one ``vllm serve`` with the kit's settings, then the kit's default
  deployment (``serve --replicas auto``: the replicas behind vllm-router). Each is warmed up, then
  loaded by client processes started behind a barrier (``load``); a level whose clients did not run
  together is run again and, if still not, marked invalid.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..deploy import Replicas
from ..plan import plan
from ..server import VLLMServer
from ..settings import Settings
from . import load
from .compare import machine, prepare_workload
from .engines import EngineSpec, run_engine
from .gpubusy import GpuBusy
from .sharing import run_engines_sharing_gpu
from .workload import ChatLike


def serve_levels(endpoint: Any, rows: list[dict], warm: list[dict], levels: list[int], clients: int) -> dict:
    name = endpoint.served_model_name
    load.run_load(endpoint.url, name, warm, min(256, len(warm)), clients)  # first traffic is slower: not counted
    out = []
    for c in levels:
        with GpuBusy() as busy:
            level = load.measured_level(endpoint.url, name, rows, c, clients)
        out.append(level | {"gpu_busy": busy.mean})
    return {"levels": out}


def one_gpu(
    model: str | Path,
    settings: Settings,
    out_dir: Path,
    requests: int = 4096,
    serve_requests: int = 4096,
    levels: tuple[int, ...] = (1024, 2048),
    hf_batch_sizes: tuple[int, ...] = (256, 1024),
    progress: Callable[[str], Any] = print,
) -> dict:
    gpu = plan(settings, "auto")
    path, description = prepare_workload(model, ChatLike(requests=requests), out_dir)
    base = EngineSpec(str(model), str(path), engine_args=settings.engine_options())
    result: dict[str, Any] = {"kind": "one-gpu", "machine": machine(), "workload": description, "plan": gpu.why}
    runs: dict[str, Any] = {}
    result["runs"] = runs
    t0 = time.monotonic()

    def step(name: str, r: dict) -> dict:
        tok = f"{r['useful_tok_s']:,.0f} useful tok/s" if "useful_tok_s" in r else f"failed: {r.get('error')}"
        progress(f"[one-gpu] {name}: {tok} ({time.monotonic() - t0:.0f} s)")
        return r

    offline = runs["offline"] = {}
    offline["single_engine"] = step("one engine, vLLM defaults", run_engine(base))
    mp = replace(base, engine_args=base.engine_args | gpu.engine_options)
    offline["single_engine_mp"] = step("one engine, mp executor", run_engine(mp))
    if gpu.engines > 1:
        shared = run_engines_sharing_gpu(mp, gpu.engines, settings)
        offline["best"] = step(f"{gpu.engines} engines side by side", shared)
    offline["qwen2"] = step("vLLM's Qwen2 class", run_engine(replace(base, engine="qwen2")))
    hf = replace(base, engine="transformers_static", hf_batch_sizes=hf_batch_sizes, hf_caches=("dynamic", "static"))
    offline["transformers"] = step("transformers at its best", run_engine(hf, timeout=900))

    serve_path, serve_description = prepare_workload(
        model, ChatLike(requests=serve_requests, seed=3), out_dir / "serve"
    )
    warm_path, _ = prepare_workload(model, ChatLike(requests=1024, seed=4), out_dir / "warm")
    rows, warm = load.rows_for(serve_path), load.rows_for(warm_path)
    clients = load.clients_for(max(levels))
    serving = runs["serving"] = {"workload": serve_description, "clients": clients}
    with VLLMServer(model, settings=settings, echo=progress) as server:
        serving["single_server"] = serve_levels(server, rows, warm, list(levels[:1]), clients)
    progress(f"[one-gpu] one server: {best_tok_s(serving['single_server']):,.0f} output tok/s")
    with Replicas(model, "auto", settings=settings, echo=progress) as fleet:
        serving["replicas"] = serve_levels(fleet, rows, warm, list(levels), clients)
        serving["replicas"] |= {"replicas": len(fleet.servers), "api_server_count": gpu.api_server_count}
    progress(f"[one-gpu] {gpu.engines} replicas + router: {best_tok_s(serving['replicas']):,.0f} output tok/s")
    return summarized(result)


def summarized(result: dict) -> dict:
    """The result with its headline keys (``summary``) at the top, rebuilt from its runs; an older layout
    (runs at the top, a ``summary`` key) is brought to this one. ``tinyllm-vllm bench report`` runs it."""
    if "runs" not in result:
        result = {k: v for k, v in result.items() if k not in ("offline", "serving", "summary")} | {
            "runs": {"offline": result["offline"], "serving": result["serving"]}
        }
    head = {k: result[k] for k in ("kind", "machine", "workload", "plan")}
    return head | summary(result) | {"runs": result["runs"]}


def best_tok_s(run: dict) -> float:
    return max((lv["output_tok_s"] for lv in run["levels"] if lv["valid"]), default=0.0)


def summary(r: dict) -> dict:
    """The keys the README and notebook 04 quote, from one run."""
    off, srv = r["runs"]["offline"], r["runs"]["serving"]
    best = off.get("best") or off["single_engine_mp"]
    hf = off["transformers"]
    top = max((lv for lv in srv["replicas"]["levels"] if lv["valid"]), key=lambda lv: lv["output_tok_s"], default=None)
    all_levels = srv["single_server"]["levels"] + srv["replicas"]["levels"]
    return {
        "single_engine_useful_tok_s": off["single_engine"].get("useful_tok_s"),
        "single_engine_gpu_busy": _busy(off["single_engine"]),
        "best_offline": {
            "engines": best.get("engines", 1),
            "engine_options": {"distributed_executor_backend": "mp"},
            "useful_tok_s": best.get("useful_tok_s"),
            "gpu_busy": _busy(best),
        },
        "transformers_best_useful_tok_s": hf.get("useful_tok_s"),
        "transformers_best_settings": {"cache": hf.get("cache"), "batch_size": hf.get("batch_size")},
        "qwen2_useful_tok_s": off["qwen2"].get("useful_tok_s"),
        "serving": {
            "single_server_tok_s": best_tok_s(srv["single_server"]),
            "best": {
                "replicas": srv["replicas"]["replicas"],
                "api_server_count": srv["replicas"]["api_server_count"],
                "tok_s": top["output_tok_s"] if top else None,
                "ttft_ms_p99": top["ttft_ms_p99"] if top else None,
                "concurrency": top["concurrency"] if top else None,
            },
            "client_overlap_min": min(lv["client_overlap"] for lv in all_levels),
            "client_cpu_share_max": max(lv["client_cpu_share_max"] for lv in all_levels),
            "failed": sum(lv["failed"] for lv in all_levels),
        },
    }


def _busy(r: dict) -> float | None:
    runs = r.get("runs") or []
    return runs[-1].get("gpu_busy") if runs else None
