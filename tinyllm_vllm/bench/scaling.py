"""Serving throughput through one endpoint: one server, then N replicas behind ``vllm-router``.

All replicas are started once, each with 1/N_max of the memory budget (for a 92M model the KV cache
is far from the limit either way), and the router is started in front of the first 1, 2, ... of
them in turn, so every number comes from the same servers in the same run. One warm-up run through
all of them comes first: the first traffic a server sees is slower (seen: 21k against 33k output
tok/s on an H100), and it would otherwise land on whichever configuration is measured first.
Each level is a barrier-started load from several client processes (``load``); a level whose clients
did not run together is marked invalid and not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tinyllm_vllm.bench import load
from tinyllm_vllm.bench.compare import machine
from tinyllm_vllm.runtime import logs
from tinyllm_vllm.runtime.deploy import Replicas, Router
from tinyllm_vllm.settings import Settings


def levels(
    url: str,
    name: str,
    workload: Path,
    concurrencies: Sequence[int],
    progress: Callable[[str], Any],
    label: str,
) -> list[dict]:
    out = []
    rows = load.rows_for(workload)
    for c in concurrencies:
        r = load.measured_level(url, name, rows, c, load.clients_for(c))
        progress(
            f"[scaling] {label}, concurrency {c}: {r['output_tok_s']:,.0f} output tok/s, TTFT p50 "
            f"{r['ttft_ms_p50'] or 0:.0f} ms, {r['failed']} failed, clients overlapped {r['client_overlap']:.0%}"
            + ("" if r["valid"] else " (INVALID: not counted)")
        )
        out.append(r)
    return out


def replicas_scaling(
    model: str | Path,
    settings: Settings,
    workload: Path,
    counts: Sequence[int],
    concurrencies: Sequence[int],
    vllm_args: Sequence[str] = (),
    progress: Callable[[str], Any] = print,
    save: Callable[[dict], Any] | None = None,
    after: Callable[[Replicas], Any] | None = None,
) -> dict:
    """One server directly, then the router over 1..N of the same replicas, at each concurrency.

    ``save`` gets the result so far after each configuration (a long run keeps what it measured);
    ``after`` gets the whole fleet, its router over every replica, once the measurements are done."""
    result: dict[str, Any] = {
        "kind": "scaling",
        "machine": machine(),
        "settings": settings.engine_options(),
        "vllm_args": list(vllm_args),
        "replica_memory_share": 1 / max(counts),
        "runs": {},
    }
    runs = result["runs"]
    with Replicas(model, max(counts), vllm_args, settings=settings, echo=progress) as fleet:
        fleet.wait_all()
        name = fleet.served_model_name
        result["warm_up"] = levels(fleet.url, name, workload, concurrencies[:1], progress, "warm-up")
        runs["1 server (no router)"] = levels(fleet.servers[0].url, name, workload, concurrencies, progress, "1 server")
        if save:
            save(result)
        for n in counts:
            label = f"{n} replica{'s' if n > 1 else ''} + router"
            if n == len(fleet.servers):  # the fleet's own router already fronts all of them
                runs[label] = levels(fleet.url, name, workload, concurrencies, progress, f"{n} replicas")
            else:
                urls, log = [s.url for s in fleet.servers[:n]], logs.new_log_file(settings.logs, "vllm-router")
                with Router(urls, log_file=log, echo=None) as router:
                    runs[label] = levels(router.url, name, workload, concurrencies, progress, f"{n} replicas")
            if save:
                save(result)
        if after:
            after(fleet)
    return result


def summary(scaling: dict) -> dict:
    """``single_server_tok_s`` and, per replica count, tok/s and TTFT at the highest concurrency."""

    def best(levels: list[dict]) -> float:
        return max((lv["output_tok_s"] for lv in levels if lv.get("valid")), default=0.0)

    single = best(scaling["runs"]["1 server (no router)"])
    replicas = {}
    for name, lv in scaling["runs"].items():
        measured = [x for x in lv if x.get("valid")]
        if "router" not in name or not measured:
            continue
        top = measured[-1]
        replicas[name.split()[0]] = {
            "output_tok_s": best(lv),
            "at_highest_concurrency": {
                "concurrency": top["concurrency"],
                "output_tok_s": top["output_tok_s"],
                "ttft_ms_p50": top["ttft_ms_p50"],
                "ttft_ms_p99": top["ttft_ms_p99"],
            },
        }
    best_n = max(replicas, key=lambda n: replicas[n]["output_tok_s"]) if replicas else None
    return {
        "single_server_tok_s": single,
        "replicas": replicas,
        "best_replicas": best_n,
        "best_over_single": replicas[best_n]["output_tok_s"] / single if best_n and single else None,
    }
