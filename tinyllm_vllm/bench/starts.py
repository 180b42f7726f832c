"""``tinyllm-vllm bench starts``: where an engine's start goes on this machine -> starts.json

One model, one fresh compile cache, starts one after another, each split into the segments of
``startup.timeline`` (process, CUDA and worker start, weights, compile, memory and KV cache, CUDA graphs,
warm-up, API server):

* the offline engine, cold (it compiles) and again (the compile cache is hit);
* again while another process holds a CUDA context on the GPU: what a start costs when the driver
  is already up (as with persistence mode on, or any other process on the GPU);
* lighter settings, cold: vLLM's ``-O1`` and ``-O0`` (no compile, no CUDA graphs), with the throughput
  each one gives on the same requests (the cost of starting faster);
* one ``vllm serve`` with the kit's settings, after the offline engine (does it hit that cache?);
* ``serve``: the kit's replicas (``plan``) as ``tinyllm-vllm serve`` starts them (staggered on a GPU), in a
  fresh kit home and then in the same home again, and once more with every replica started at once (what the
  stagger changes): seconds to the first answer and until every replica has joined the router, each
  replica's start phases, and requests sent all through the joins (none may fail).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tinyllm_vllm.bench.compare import machine, prepare_workload
from tinyllm_vllm.bench.engines import EngineSpec, run_engine
from tinyllm_vllm.bench.workload import ChatLike
from tinyllm_vllm.runtime import procs, startup
from tinyllm_vllm.runtime.deploy import Replicas
from tinyllm_vllm.runtime.plan import plan
from tinyllm_vllm.runtime.server import VLLMServer
from tinyllm_vllm.settings import Settings

HOLD_CUDA = "import sys, torch; torch.zeros(1, device='cuda'); print('READY', flush=True); sys.stdin.read()"


def _offline(spec: EngineSpec, label: str, log: Path) -> dict:
    t0 = time.time()
    r = run_engine(spec, log=log)
    if "error" in r:
        return {"what": label, "error": r["error"][-2000:]}
    ready = r["ready_at"]
    text = log.read_text(errors="replace")
    p = startup.phases(text)
    return {
        "what": label,
        "seconds": round(ready - t0, 1),
        "cold": startup.cold_of(p),
        "phases": p,
        "timeline": startup.timeline(text, t0, ready),
        "useful_tok_s": round(r["useful_tok_s"]),
    }


def _recorded(home: Path, since: float) -> list[dict]:
    keep = ("what", "seconds", "cold", "phases", "timeline")
    return [{k: r[k] for k in keep if k in r} for r in startup.read_starts(home) if r["at"] >= since]


STARTS = ("offline", "server", "serve")


def starts(
    model: str | Path,
    settings: Settings,
    out_dir: Path,
    requests: int = 1024,
    progress: Callable = print,
    parts: tuple[str, ...] = STARTS,
) -> dict:
    """Time each start (see the module's docstring) in a fresh kit home and compile cache under ``out_dir``;
    ``parts`` picks which of them (``STARTS``), each in the order above."""
    home = out_dir / "home"
    settings = settings.replace(home=home)
    os.environ["VLLM_CACHE_ROOT"] = str(home / "vllm-cache")  # fresh: the first start compiles
    logs = home / "logs"
    result: dict[str, Any] = {"kind": "starts", "machine": machine(), "timed": list(parts)}
    result["starts"] = []
    out = result["starts"]

    def step(r: dict) -> None:
        out.append(r)
        line = f"{r['seconds']} s" if "seconds" in r else f"failed: {r.get('error', '')[-300:]}"
        progress(f"[starts] {r['what']}: {line} {r.get('timeline', '')}")

    if "offline" in parts:  # engines of the plan's options, on the requests they are timed with
        path, result["workload"] = prepare_workload(model, ChatLike(requests=requests), out_dir)
        engine_args = settings.engine_options() | plan(settings, "auto").engine_options
        _offline_starts(EngineSpec(str(model), str(path), engine_args=engine_args), logs, step)
    if "server" in parts:
        t = time.time()
        try:
            with VLLMServer(model, settings=settings, echo=None):
                pass
        except Exception as e:  # a failed server start is a result too; what started is stopped already
            out.append({"what": "server", "error": str(e)[-2000:]})
        for r in _recorded(home, t):
            step(r)
    if "serve" in parts:
        result["serve"] = _serve_starts(model, settings, out_dir / "serve-home", progress)
    result["persistence_mode"] = _persistence_mode()
    return summarized(result)


def _offline_starts(base: EngineSpec, logs: Path, step: Callable[[dict], None]) -> None:
    step(_offline(base, "offline engine, first start", logs / "offline-1.log"))
    step(_offline(base, "offline engine, again", logs / "offline-2.log"))
    holder = procs.start_group([sys.executable, "-c", HOLD_CUDA], logs / "cuda-holder.log", pipes=True)
    try:
        if holder.stdout.readline().strip() == "READY":
            step(_offline(base, "offline engine, again, CUDA already up in another process", logs / "offline-3.log"))
    finally:
        procs.stop_group(holder, grace=0)
    for level in (1, 0):
        light = replace(base, engine_args=base.engine_args | {"optimization_level": level})
        step(_offline(light, f"offline engine, -O{level}, first start", logs / f"offline-O{level}.log"))


def _serve_starts(model: str | Path, settings: Settings, serve_home: Path, progress: Callable) -> list[dict]:
    os.environ["VLLM_CACHE_ROOT"] = str(serve_home / "vllm-cache")  # fresh again: the first serve compiles
    out = []
    # the plan's start (staggered on a GPU), fresh and warm; then warm with every replica started at once
    for label, stagger in (("fresh home", None), ("same home again", None), ("same home again, all at once", False)):
        r = serve_start(model, settings.replace(home=serve_home), label, stagger=stagger)
        out.append(r)
        progress(
            f"[starts] serve, {label}: first answer after {r.get('first_answer_s')} s, all {r.get('replicas')} "
            f"replicas after {r.get('all_replicas_s')} s, {r.get('failed_during_joins')} of "
            f"{r.get('requests_during_joins')} requests failed during the joins {r.get('error', '')}"
        )
    return out


def serve_start(
    model: str | Path, settings: Settings, label: str, clients: int = 8, stagger: bool | None = None
) -> dict:
    """``serve``'s start as a user meets it: the replicas of the plan (``stagger``: as ``Replicas`` takes it), the
    endpoint answering on the first; while the others join, ``clients`` threads send chat requests without
    pause, and every failure is counted."""
    import threading

    import httpx

    t = time.time()
    stop = threading.Event()
    counts = {"sent": 0, "failed": 0}
    out: dict[str, Any] = {"what": f"serve, {label}"}

    def send(url: str, name: str) -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                body = {"model": name, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 32}
                try:
                    ok = client.post(url + "/chat/completions", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                counts["sent"] += 1
                counts["failed"] += not ok

    try:
        with Replicas(model, "auto", settings=settings, echo=None, stagger=stagger) as fleet:
            out |= {"replicas": len(fleet.servers), "staggered": fleet.stagger}
            out["first_answer_s"] = round(fleet.first_answer_s, 1)
            senders = [
                threading.Thread(target=send, args=(fleet.base_url, fleet.served_model_name)) for _ in range(clients)
            ]
            for th in senders:
                th.start()
            try:
                fleet.wait_all()
            finally:
                stop.set()
                for th in senders:
                    th.join()
            out["all_replicas_s"] = round(fleet.all_ready_s, 1)
    except Exception as e:  # a failed start is a result too; what started is stopped already
        out["error"] = str(e)[-2000:]
    out |= {"requests_during_joins": counts["sent"], "failed_during_joins": counts["failed"]}
    out["starts"] = [r for r in _recorded(settings.home, t) if r["what"].startswith("replica")]
    out["cold"] = any(startup.cold_of(r.get("phases", {})) for r in out["starts"])
    return out


def summarized(result: dict) -> dict:
    """The result with ``cold`` per start (from its phases) and its headline (``summary``) rebuilt."""
    by = {}
    for st in result["starts"]:
        if "phases" in st:
            st["cold"] = startup.cold_of(st["phases"])
        by[st["what"]] = st
    replicas = [st["seconds"] for st in result["starts"] if st["what"].startswith("replica") and "seconds" in st]

    def sec(what: str) -> float | None:
        return by.get(what, {}).get("seconds")

    result["summary"] = {
        "first_start_s": sec("offline engine, first start"),
        "later_start_s": sec("offline engine, again"),
        "later_start_cuda_up_s": sec("offline engine, again, CUDA already up in another process"),
        "server_after_offline_s": sec("server"),
        "server_compile_cache_hit": by.get("server", {}).get("phases", {}).get("compile_cache_hit"),
        "replicas_all_ready_s": max(replicas) if replicas else None,
        "replicas": len(replicas),
        "O1_first_start_s": sec("offline engine, -O1, first start"),
        "O0_first_start_s": sec("offline engine, -O0, first start"),
        "tok_s_default_O2": by.get("offline engine, first start", {}).get("useful_tok_s"),
        "tok_s_O1": by.get("offline engine, -O1, first start", {}).get("useful_tok_s"),
        "tok_s_O0": by.get("offline engine, -O0, first start", {}).get("useful_tok_s"),
    }
    if result.get("serve"):  # serve's start: the first answer and full capacity, in the warm home
        serve = {r["what"]: r for r in result["serve"]}
        warm = serve.get("serve, same home again", {})
        result["summary"] |= {
            "replicas_all_ready_s": warm.get("all_replicas_s"),
            "replicas": warm.get("replicas"),
            "serve_first_answer_s": warm.get("first_answer_s"),
            "serve_cold_first_answer_s": serve.get("serve, fresh home", {}).get("first_answer_s"),
            "serve_failed_during_joins": sum(r.get("failed_during_joins", 0) for r in result["serve"]),
        }
        if at_once := serve.get("serve, same home again, all at once"):
            result["summary"] |= {
                "serve_at_once_first_answer_s": at_once.get("first_answer_s"),
                "serve_at_once_all_replicas_s": at_once.get("all_replicas_s"),
            }
    return {k: result[k] for k in ("kind", "summary")} | {k: v for k, v in result.items() if k != "summary"}


def _persistence_mode() -> str | None:
    found = procs.gpus()
    return found[0]["persistence_mode"] if found else None
