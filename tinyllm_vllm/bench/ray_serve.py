"""``tinyllm-vllm bench ray``: Ray Serve LLM against the kit's replicas behind vllm-router -> ray_serve.json

On one GPU, the same number of replicas (``plan``) each way, the same chat-like load from client
processes started behind one barrier (``load``), each endpoint warmed up the same way first:

* Ray Serve LLM (``cluster.RayServe``): output tok/s and TTFT at each level; then one LLM replica's process
  is killed while a level runs: requests failed or cut short, and the seconds until Ray Serve reports
  every replica running again;
* the kit's replicas behind vllm-router (``deploy.Replicas``) on the same requests.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..cluster import RayServe, marked
from ..deploy import Replicas
from ..plan import plan
from ..settings import Settings
from . import load
from .compare import machine, prepare_workload
from .onegpu import best_tok_s, serve_levels
from .workload import ChatLike


def _kill_one_under_load(app: RayServe, rows: list[dict], concurrency: int, clients: int, after_s: float) -> dict:
    """Run a level; ``after_s`` after its clients start sending, SIGKILL one LLM replica; time until Ray Serve
    has them all running again."""
    out: dict[str, Any] = {}
    began: queue.Queue[float] = queue.Queue()
    runner = threading.Thread(
        target=lambda: out.update(
            load.run_load(app.url, app.served_model_name, rows, concurrency, clients, began=began.put)
        )
    )
    n = len(app.replica_pids())
    runner.start()
    try:
        at = began.get(timeout=300)
    except queue.Empty:
        raise RuntimeError("the load's clients did not start within 300 s") from None
    time.sleep(max(0.0, at + after_s - time.time()))
    victim = app.replica_pids()[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    under_load = runner.is_alive()  # the level was still running when the replica died
    restart_s = None
    time.sleep(1)
    while time.monotonic() - killed_at < 600:
        running = sum(
            s.get("RUNNING", 0)
            for name, s in app.status().get("deployments", {}).items()
            if name.startswith("LLMServer")
        )
        if running >= n and victim not in app.replica_pids():
            restart_s = round(time.monotonic() - killed_at, 1)
            break
        time.sleep(0.5)
    runner.join()
    return {
        "replicas": n,
        "killed_after_s": after_s,
        "under_load": under_load,
        "failed": out.get("failed"),
        "lost": out.get("incomplete"),
        "completed": out.get("completed"),
        "requests": out.get("requests"),
        "restart_s": restart_s,
        "errors": out.get("errors"),
        "level": out,
    }


def ray_vs_router(
    model: str | Path,
    settings: Settings,
    out_dir: Path,
    requests: int = 4096,
    levels: tuple[int, ...] = (1024,),
    progress: Callable[[str], Any] = print,
) -> dict:
    gpu = plan(settings, "auto")  # both sides get the same plan
    n = gpu.engines
    serve_path, description = prepare_workload(model, ChatLike(requests=requests, seed=3), out_dir / "serve")
    warm_path, _ = prepare_workload(model, ChatLike(requests=1024, seed=4), out_dir / "warm")
    rows, warm = load.rows_for(serve_path), load.rows_for(warm_path)
    clients = load.clients_for(max(levels))
    result: dict[str, Any] = {
        "kind": "ray-serve",
        "machine": machine(),
        "ray": md.version("ray"),
        "vllm": md.version("vllm"),
        "replicas": n,
        "workload": description,
        "clients": clients,
    }
    runs: dict[str, Any] = {}
    with RayServe(model, n, settings=settings, echo=progress) as app:
        runs["ray"] = serve_levels(app, rows, warm, list(levels), clients) | {"start_s": round(app.ready_s, 1)}
        progress(f"[ray] Ray Serve LLM, {n} replicas: {best_tok_s(runs['ray']):,.0f} output tok/s")
        # every request of the level, the replica killed 1 s into it: on a GPU the level lasts seconds
        killed = _kill_one_under_load(app, rows, levels[0], clients, after_s=1)
        progress(
            f"[ray] one replica killed: {killed['failed']} failed, {killed['lost']} cut short, "
            f"back after {killed['restart_s']} s"
        )
    result["ray_processes_left"] = len(marked(app.token))
    with Replicas(model, gpu, settings=settings, echo=progress) as fleet:
        runs["router"] = serve_levels(fleet, rows, warm, list(levels), clients)
    progress(f"[ray] kit's replicas + vllm-router: {best_tok_s(runs['router']):,.0f} output tok/s")
    best = max(runs["ray"]["levels"], key=lambda lv: lv["output_tok_s"] if lv["valid"] else -1)
    router = max(runs["router"]["levels"], key=lambda lv: lv["output_tok_s"] if lv["valid"] else -1)
    result |= {
        "output_tok_s": round(best["output_tok_s"]),
        "ttft_ms_p50": round(best["ttft_ms_p50"] or 0),
        "ttft_ms_p99": round(best["ttft_ms_p99"] or 0),
        "router_output_tok_s": round(router["output_tok_s"]),
        "router_ttft_ms_p99": round(router["ttft_ms_p99"] or 0),
        "replica_killed": {
            k: killed[k] for k in ("failed", "lost", "restart_s", "completed", "requests", "under_load")
        },
        "runs": runs | {"ray_replica_killed": killed},
    }
    return result
