"""A serving load that really runs together: K client processes start behind one barrier.

Each client is a process of its own (one asyncio client tops out at a few thousand streams a second
of Python work), holding ``concurrency / K`` streamed ``/v1/completions`` requests in flight with
``aiohttp``. All clients load their requests, then wait at a barrier; the parent sets one start time
and every client begins at it. Each records, per request, when it was sent, its first token and its
end, and for itself the share of its wall time it spent on the CPU (near 1.0 means the client, not the
server, set the pace). ``overlap`` is the share of the level's span during which every client was
sending: a level under ``MIN_OVERLAP`` is not a load of that concurrency and is reported invalid.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MIN_OVERLAP = 0.9


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


async def _client(url: str, model: str, rows: list[dict], concurrency: int, start_at: float) -> dict:
    import aiohttp

    records: list[dict] = []
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.sleep(max(0.0, start_at - time.time()))

        async def one(row: dict) -> None:
            body = {
                "model": model,
                "prompt": row["prompt"],
                "max_tokens": row["output_tokens"],
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with sem:
                rec: dict[str, Any] = {"sent": time.time(), "first": None, "tokens": 0, "error": None}
                rec["asked"] = row["output_tokens"]
                try:
                    async with http.post(url + "/v1/completions", json=body) as r:
                        if r.status != 200:
                            rec["error"] = f"HTTP {r.status}: {(await r.text())[:200]}"
                        else:
                            async for raw in r.content:
                                line = raw.decode().strip()
                                if not line.startswith("data: ") or line == "data: [DONE]":
                                    continue
                                event = json.loads(line[6:])
                                if rec["first"] is None and event.get("choices"):
                                    rec["first"] = time.time()
                                if event.get("usage"):
                                    rec["tokens"] = event["usage"]["completion_tokens"]
                except (aiohttp.ClientError, TimeoutError, ValueError) as e:  # ValueError: a stream cut mid-event
                    rec["error"] = f"{type(e).__name__}: {e}"
                rec["end"] = time.time()
                records.append(rec)

        cpu0, wall0 = time.process_time(), time.time()
        await asyncio.gather(*(one(r) for r in rows))
        cpu_share = (time.process_time() - cpu0) / max(1e-9, time.time() - wall0)
    return {"records": records, "cpu_share": cpu_share}


def _client_process(
    url: str, model: str, rows: list[dict], concurrency: int, barrier: Any, start: Any, out: Any
) -> None:
    import aiohttp  # noqa: F401  (imported before the barrier: the start is not an import)

    barrier.wait()
    out.put(asyncio.run(_client(url, model, rows, concurrency, start.value)))


def run_load(
    url: str,
    model: str,
    rows: list[dict],
    concurrency: int,
    clients: int,
    timeout: float = 1800,
    began: Callable[[float], Any] | None = None,
) -> dict:
    """Send ``rows`` (``prompt``, ``output_tokens``) to ``url`` from ``clients`` processes started together,
    ``concurrency`` requests in flight in all. Returns throughput, TTFT percentiles, failures and the overlap.
    ``began`` gets the wall-clock time the clients start sending, once they are all ready."""
    ctx = mp.get_context("spawn")
    clients = max(1, min(clients, concurrency, len(rows)))
    # longest first, dealt round robin: every client gets the same mix, and each one's last requests are
    # short ones, so the clients finish together instead of one long reply keeping a single client busy
    rows = sorted(rows, key=lambda r: -r["output_tokens"])
    barrier, start, out = ctx.Barrier(clients + 1), ctx.Value("d", 0.0), ctx.Queue()
    share = [concurrency // clients + (1 if i < concurrency % clients else 0) for i in range(clients)]
    procs = [
        ctx.Process(
            target=_client_process, args=(url, model, rows[i::clients], share[i], barrier, start, out), daemon=True
        )
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    try:
        start.value = time.time() + 0.5  # set before the barrier opens: every client reads the same time
        barrier.wait(timeout=300)
        if began:
            began(start.value)
        results = [out.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return summarize(results, concurrency)


def overlap(per_client: list[list[dict]]) -> float:
    """The share of the span (first send to last end) during which every client had requests under way."""
    firsts = [min(r["sent"] for r in recs) for recs in per_client if recs]
    lasts = [max(r["end"] for r in recs) for recs in per_client if recs]
    span = max(lasts) - min(firsts)
    return max(0.0, min(lasts) - max(firsts)) / span if span > 0 else 0.0


def summarize(results: list[dict], concurrency: int) -> dict:
    recs = [r for res in results for r in res["records"]]
    ok = [r for r in recs if not r["error"]]
    span = max(r["end"] for r in recs) - min(r["sent"] for r in recs)
    ttft = [(r["first"] - r["sent"]) * 1000 for r in ok if r["first"]]
    tokens = sum(r["tokens"] for r in ok)
    # time per output token after the first, per request
    tpot = [(r["end"] - r["first"]) * 1000 / (r["tokens"] - 1) for r in ok if r["first"] and r["tokens"] > 1]
    level = {
        "concurrency": concurrency,
        "clients": len(results),
        "requests": len(recs),
        "completed": len(ok),
        "failed": len(recs) - len(ok),
        # failed before its first token: a request a retry could have sent elsewhere without the user noticing
        "failed_not_begun": sum(1 for r in recs if r["error"] and r["first"] is None),
        # answered without an error, yet fewer tokens than asked (ignore_eos): a stream the server cut short
        "incomplete": sum(1 for r in ok if r["tokens"] < r.get("asked", 0)),
        "errors": sorted({r["error"] for r in recs if r["error"]})[:5],
        "duration_s": span,
        "output_tokens": tokens,
        "output_tok_s": tokens / span if span else 0.0,
        "requests_s": len(ok) / span if span else 0.0,
        "ttft_ms_p50": _percentile(ttft, 50),
        "ttft_ms_p99": _percentile(ttft, 99),
        "e2e_ms_p50": _percentile([(r["end"] - r["sent"]) * 1000 for r in ok], 50),
        "tpot_ms_p50": _percentile(tpot, 50),
        "tpot_ms_p99": _percentile(tpot, 99),
        "client_overlap": overlap([res["records"] for res in results]),
        "client_cpu_share_max": max(res["cpu_share"] for res in results),
        "client_cpu_share_mean": statistics.fmean(res["cpu_share"] for res in results),
    }
    from tinyllm_vllm.rule import steady

    rate = steady(
        [{"sent": r["sent"], "first": r["first"], "end": r["end"], "tokens": r["tokens"]} for r in ok], concurrency
    )
    level |= {"steady_tok_s": rate["steady_tok_s"], "steady_s": rate["steady_s"]}
    level["valid"] = level["client_overlap"] >= MIN_OVERLAP and level["failed"] == 0
    return level


class Metrics:
    """vLLM's ``/metrics`` of each server, read every ``interval`` s while a level runs: requests running and
    waiting, KV-cache use and preemptions, so a level's rate can be explained by what the engines did."""

    NAMES = {
        "vllm:num_requests_running": "running",
        "vllm:num_requests_waiting": "waiting",
        "vllm:kv_cache_usage_perc": "kv_cache_usage",
        "vllm:num_preemptions_total": "preemptions",
    }

    def __init__(self, urls: list[str], interval: float = 1.0) -> None:
        import threading

        self.urls, self.interval = urls, interval
        self.samples: dict[str, list[dict[str, float]]] = {u: [] for u in urls}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self, url: str) -> dict[str, float]:
        import httpx

        out: dict[str, float] = {}
        for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in self.NAMES and not line.startswith("#"):
                key = self.NAMES[name]
                out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for u in self.urls:
                try:
                    self.samples[u].append(self.read(u))
                except Exception:  # a server busy past the timeout: this sample is missing, the level goes on
                    pass
            self._stop.wait(self.interval)

    def __enter__(self) -> Metrics:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> list[dict]:
        """Per server: mean running and waiting requests, peak KV-cache use, preemptions during the level."""
        out = []
        for u, xs in self.samples.items():
            if not xs:
                out.append({"url": u, "samples": 0})
                continue

            def mean(key: str, xs: list[dict[str, float]] = xs) -> float | None:
                vals = [x[key] for x in xs if key in x]
                return round(statistics.fmean(vals), 1) if vals else None

            kv = [x["kv_cache_usage"] for x in xs if "kv_cache_usage" in x]
            pre = [x["preemptions"] for x in xs if "preemptions" in x]
            out.append(
                {
                    "url": u,
                    "samples": len(xs),
                    "running_mean": mean("running"),
                    "waiting_mean": mean("waiting"),
                    "kv_cache_usage_max": max(kv) if kv else None,
                    "preemptions": (pre[-1] - pre[0]) if pre else None,
                }
            )
        return out


def clients_for(concurrency: int) -> int:
    """Client processes for a level: one per 256 streams in flight (one asyncio client drives a few hundred
    easily), at most one per 4 CPU cores (the servers need the rest) and 8, at least 2 (so overlap means
    something)."""
    import math
    import os

    cores = len(os.sched_getaffinity(0))
    return max(2, min(8, cores // 4, math.ceil(concurrency / 256)))


def rows_for(workload: str | Path) -> list[dict]:
    """The workload's requests as the load client sends them: the prompt and the length each asks for."""
    from tinyllm_vllm.bench.workload import read_jsonl

    return [{"prompt": r["prompt"], "output_tokens": r["output_tokens"]} for r in read_jsonl(workload)]


def measured_level(url: str, model: str, rows: list[dict], concurrency: int, clients: int, tries: int = 2) -> dict:
    """One level, run again (up to ``tries``) while its clients did not run together; the last run is kept
    and says whether it is valid."""
    for _ in range(tries):
        level = run_load(url, model, rows, concurrency, clients)
        if level["client_overlap"] >= MIN_OVERLAP:
            break
    return level
