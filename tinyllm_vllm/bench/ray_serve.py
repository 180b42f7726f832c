"""``tinyllm-vllm bench ray``: Ray Serve LLM against the kit's replicas behind vllm-router -> ray_serve.json

On one GPU, one plan for both sides (the same replicas and engine options), the same chat-like request
stream and the same measurement rule as ``bench one-gpu`` (``onegpu.serve_levels``: warm-up on other
requests, each level repeated on its own requests, steady-state rate, clients behind one barrier):

* Ray Serve LLM (``cluster.RayServe``): output tok/s and TTFT at each level; then one LLM replica's process
  is killed while a level runs: requests failed or cut short, and the seconds until Ray Serve reports
  every replica running again;
* the kit's replicas behind vllm-router (``deploy.Replicas``) on the same requests;
* two Ray nodes on this machine (``cluster.LocalCluster``): the app spread over both, the worker node's raylet
  killed, the time until the app serves again from the node left;
* a batch: the same rows through ``generate --input`` and ``generate --input --ray`` (Ray Data LLM).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tinyllm_vllm.bench import load
from tinyllm_vllm.bench.compare import machine
from tinyllm_vllm.bench.onegpu import batch_run, best_level, serve_levels
from tinyllm_vllm.bench.workload import ChatLike, describe, text_rows
from tinyllm_vllm.rule import Rule
from tinyllm_vllm.runtime import procs
from tinyllm_vllm.runtime.cluster import MARK, LocalCluster, RayServe
from tinyllm_vllm.runtime.deploy import Replicas
from tinyllm_vllm.runtime.plan import plan
from tinyllm_vllm.settings import Settings


def _kill_one_under_load(app: RayServe, rows: list[dict], concurrency: int, clients: int) -> dict:
    """Run a level; a quarter of its expected time after its clients start sending (one request's time per
    row over the concurrency, at least 2 s), SIGKILL one LLM replica; time until Ray Serve has them all
    running again."""
    after_s = max(2.0, 0.25 * len(rows) / concurrency)
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
        "failed_not_begun": out.get("failed_not_begun"),
        "lost": out.get("incomplete"),
        # streams that began and did not end whole: cut with an error, or ended early without one
        "cut": (out.get("failed") or 0) - (out.get("failed_not_begun") or 0) + (out.get("incomplete") or 0),
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
    rule: Rule,
    dist: ChatLike,
    requests: int = 16384,
    levels: tuple[int, ...] = (1024,),
    batch_rows: int = 16384,
    modes: tuple[str, ...] = ("default", "throughput"),
    progress: Callable[[str], Any] = print,
) -> dict:
    """Ray Serve LLM in each of ``modes`` (``default``: Ray Serve's own settings; ``throughput``: Ray's
    high-throughput mode, ``cluster.throughput_env``) and the kit's replicas behind vllm-router, on the same
    plan, the same request stream and the same measurement rule (``onegpu.serve_levels``); one Ray replica
    killed under load in the last mode; then the batch on Ray Data LLM against ``generate --input``."""
    from transformers import AutoTokenizer

    import tinyllm_vllm.model.config  # noqa: F401  (registers model_type tinyllm)

    gpu = plan(settings, "auto")  # both sides get the same plan
    n = gpu.engines
    tok = AutoTokenizer.from_pretrained(str(model))
    result: dict[str, Any] = {
        "kind": "ray-serve",
        "machine": machine(),
        "ray": md.version("ray"),
        "vllm": md.version("vllm"),
        "replicas": n,
        "plan": gpu.why,
        "workload": describe(dist),
        "method": rule.describe(),
    }
    runs: dict[str, Any] = {"ray_modes": {}}
    left = 0
    for i, mode in enumerate(modes):
        with RayServe(model, gpu, settings=settings, throughput=mode == "throughput", echo=progress) as app:
            llm = app.config["applications"][0]["args"]["llm_configs"][0]
            mode_settings = {k: llm[k] for k in ("engine_kwargs", "deployment_config", "placement_group_config")}
            mode_settings |= {"mode": mode, "driver_env": app.driver_env}
            mode_settings["ingress"] = app.config["applications"][0]["args"].get("ingress_deployment_config")
            label = f"ray: Ray Serve LLM, {mode}"
            measured = serve_levels(app, dist, tok, rule, requests, levels, progress, label=label)
            runs["ray_modes"][mode] = measured | {"start_s": round(app.ready_s, 1), "settings": mode_settings}
            if i == len(modes) - 1:  # the last mode (the tuned one, by default) also loses a replica under load
                rows = text_rows(replace(dist, seed=dist.seed + 2), tok, range(requests))
                killed = _kill_one_under_load(app, rows, levels[0], load.clients_for(levels[0]))
                progress(
                    f"[ray] one replica killed: {killed['failed']} failed "
                    f"({killed['failed_not_begun']} before a token), {killed['cut']} cut short, "
                    f"back after {killed['restart_s']} s"
                )
        left += len(procs.marked(MARK, app.token))
    # the headline is the mode that served the most
    best_mode = max(modes, key=lambda m: (best_level(runs["ray_modes"][m]) or {}).get("tok_s") or 0)
    app_settings = runs["ray_modes"][best_mode]["settings"]
    result["ray_processes_left"] = left
    with Replicas(model, gpu, settings=settings, echo=progress) as fleet:
        fleet.wait_all()
        urls = [s.url for s in fleet.servers]
        runs["router"] = serve_levels(
            fleet, dist, tok, rule, requests, levels, progress, metrics_urls=urls, label="ray: replicas + vllm-router"
        )
    try:
        two = _two_nodes(model, settings, gpu, progress)
    except Exception as e:  # the other figures stand: say what failed
        two = {"error": f"{type(e).__name__}: {e}"[-2000:]}
    runs["two_nodes"] = two
    batch = _batches(model, settings, out_dir, dist, tok, batch_rows, progress) if batch_rows else {}
    runs["batch"] = batch
    ray, router = best_level(runs["ray_modes"][best_mode]) or {}, best_level(runs["router"]) or {}
    sides = [*runs["ray_modes"].values(), runs["router"]]
    timed = [r for side in sides for lv in side["levels"] for r in lv["runs"]]
    result |= {
        "output_tok_s": ray.get("tok_s"),
        "spread": ray.get("spread"),
        "seconds": ray.get("seconds"),
        "ttft_ms_p99": ray.get("ttft_ms_p99"),
        "router_output_tok_s": router.get("tok_s"),
        "router_spread": router.get("spread"),
        "router_seconds": router.get("seconds"),
        "router_ttft_ms_p99": router.get("ttft_ms_p99"),
        "ray_over_router": ray["tok_s"] / router["tok_s"] if ray.get("tok_s") and router.get("tok_s") else None,
        "failed": sum(r["failed"] for r in timed),
        "settings": app_settings,
        "replica_killed": {
            k: killed[k]
            for k in ("failed", "failed_not_begun", "cut", "restart_s", "completed", "requests", "under_load")
        },
        "batch": {k: batch.get(k) for k in ("rows", "engines", "useful_tok_s", "local_useful_tok_s")},
        "two_nodes": {k: two.get(k) for k in ("nodes", "served", "recovered_s")},
        "runs": runs | {"ray_replica_killed": killed},
    }
    return result


def _answered(app: RayServe, n: int) -> int:
    """How many of ``n`` short chat requests the app answers."""
    import httpx

    body = {"model": app.served_model_name, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 16}
    ok = 0
    with httpx.Client(timeout=60) as client:
        for _ in range(n):
            try:
                ok += client.post(app.base_url + "/chat/completions", json=body).status_code == 200
            except httpx.HTTPError:
                pass
    return ok


def _two_nodes(model: str | Path, settings: Settings, gpu: Any, progress: Callable) -> dict:
    """The app on a Ray cluster of two nodes on this machine (``cluster.LocalCluster``, the proxy on the head): the
    replicas per node, requests answered, then the worker node's raylet killed; ``recovered_s`` is the time until
    Ray Serve reports every replica running again (on the node left) and the app answers."""
    out: dict[str, Any] = {"nodes": 2}
    with LocalCluster(settings.home, 2, echo=progress) as cluster:
        on = {"address": cluster.address, "proxy_location": "HeadOnly", "echo": progress}
        with RayServe(model, gpu, settings=settings, **on) as app:
            out["replicas_per_node"] = cluster.replicas_per_node()
            out["served"] = _answered(app, 32)
            n = gpu.engines
            cluster.kill_node(1)
            killed = time.monotonic()
            progress(f"[ray] two nodes: replicas per node {out['replicas_per_node']}; the worker node's raylet killed")
            while time.monotonic() - killed < 600:
                running = sum(
                    s.get("RUNNING", 0)
                    for name, s in app.status().get("deployments", {}).items()
                    if name.startswith("LLMServer")
                )
                if running >= n and cluster.replicas_per_node()[1] == 0 and _answered(app, 1) == 1:
                    out["recovered_s"] = round(time.monotonic() - killed, 1)
                    break
                time.sleep(1)
            out["replicas_per_node_after"] = cluster.replicas_per_node()
            out["served_after"] = _answered(app, 32)
    progress(f"[ray] two nodes: {out['served']} of 32 answered, recovered after {out.get('recovered_s')} s")
    return out


def _batches(
    model: str | Path, settings: Settings, out_dir: Path, dist: ChatLike, tok: Any, rows: int, progress: Callable
) -> dict:
    """The same rows through ``generate --input`` and ``generate --input --ray``, with the same engine count (the
    offline plan). Each rate is output tokens over the time the engines generated: from the first engine ready
    (local) or the first result back (Ray) to the last row; ``seconds`` is the whole command, starts included."""
    n = plan(settings, "auto", offline=True).engines
    local = batch_run(model, settings, out_dir, dist, tok, rows, n, progress)
    on_ray = batch_run(model, settings, out_dir, dist, tok, rows, n, progress, ray=True)

    def rate(r: dict) -> float | None:
        return r["output_tokens"] / r["generate_s"] if r.get("output_tokens") and r.get("generate_s") else None

    out = {"rows": rows, "engines": n, "useful_tok_s": rate(on_ray), "local_useful_tok_s": rate(local)}
    progress(f"[ray] batch of {rows} rows: Ray Data LLM {out['useful_tok_s']}, local {out['local_useful_tok_s']} tok/s")
    out |= {"seconds": on_ray.get("seconds"), "local_seconds": local.get("seconds")}
    return out | {"ray": on_ray, "local": local}
