"""Several engines side by side on one GPU, each on 1/k of the requests and of the memory, timed in lockstep.

One engine of a 92M model is bound by its own host work (a py-spy profile on an H100: its engine core
thread busy 84% of the time, scheduling and bookkeeping), so k engines, each with its own processes
and CPU cores, serve more. The engines start at the
same time (each with a fixed KV-cache size from ``plan.share``, so vLLM's memory profiling in one
does not see the others), warm up, and then run each repeat together; a repeat lasts as long as its
slowest engine.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from dataclasses import replace

from tinyllm_vllm.bench import engines
from tinyllm_vllm.bench.engines import EngineSpec
from tinyllm_vllm.runtime import logs
from tinyllm_vllm.runtime.plan import share
from tinyllm_vllm.settings import Settings


def run_engines_sharing_gpu(spec: EngineSpec, k: int, settings: Settings) -> dict:
    """``spec`` as for ``engines.run_engine`` (a vLLM engine), each engine with its ``plan.share`` of
    ``settings``' memory; returns the combined result."""
    args = spec.engine_args | share(settings, k).engine_options()
    log_files = [logs.new_log_file(engines.bench_logs(), f"bench-engine-{i + 1}-of-{k}") for i in range(k)]
    started: list[subprocess.Popen] = []

    def failure(i: int, what: str) -> RuntimeError:
        return RuntimeError(
            f"engine {i + 1}/{k} sharing the GPU {what} (log: {log_files[i]}):\n{logs.tail(log_files[i], 30)}"
        )

    try:
        # started together: each has a fixed memory share (``plan.share``), so none profiles the others
        launched = time.time()
        for i, log in enumerate(log_files):
            started.append(engines.start_lockstep(replace(spec, engine_args=args, shard=(i, k)), log))
        from tinyllm_vllm.rule import Rule

        repeats = Rule(**spec.rule).repeats if spec.rule else spec.repeats
        for _ in range(repeats):
            for i in range(k):
                if not engines.ready(started[i]):
                    raise failure(i, f"exited with code {started[i].wait()}")
            for p in started:  # every engine warmed up and waiting
                engines.go(p)
        results = []
        for i, p in enumerate(started):
            result = engines.result_of(p)
            if result is None:
                raise failure(i, f"failed with exit code {p.returncode}")
            results.append(result)
    finally:
        for p in started:
            engines.stop(p)
    for i, (result, log) in enumerate(zip(results, log_files, strict=True)):
        engines.record_start(settings.home, f"benchmark engine ({spec.engine}) {i + 1}/{k}", launched, result, log)
    if spec.rule:
        return combined_steady(results, spec.rule) | {"engines": k}
    runs = []
    for j in range(spec.repeats):
        timed = [[x for x in r["runs"] if x["label"] == "harness"][j] for r in results]
        elapsed = max(x["elapsed_s"] for x in timed)
        useful = sum(x["useful_tokens"] for x in timed)
        runs.append(
            {
                "label": "harness",
                "elapsed_s": elapsed,
                "useful_tokens": useful,
                "useful_tok_s": useful / elapsed,
                "requests_s": sum(x["requests_s"] * x["elapsed_s"] for x in timed) / elapsed,
                "gpu_busy": max((x.get("gpu_busy") or 0 for x in timed), default=None),
            }
        )
    return {
        "engines": k,
        "runs": runs,
        "useful_tok_s": statistics.median(r["useful_tok_s"] for r in runs),
        "requests_s": statistics.median(r["requests_s"] for r in runs),
        "engine_start_s": max(r["engine_start_s"] for r in results),
    }


def combined_steady(results: list[dict], rule: dict) -> dict:
    """Engines timed together by the rule (``engines.run_vllm_steady``): each repeat's request records of all
    engines as one run, in flight against the sum of their ``max_num_seqs``."""
    from tinyllm_vllm.rule import Rule, headline, steady

    r = Rule(**rule)
    target = sum(x["max_num_seqs"] for x in results)
    runs = []
    for j in range(r.repeats):
        recs = [{"sent": a, "end": b, "tokens": n} for x in results for a, b, n in x["runs"][j]["records"]]
        busy = [x["runs"][j]["gpu_busy"] for x in results if x["runs"][j]["gpu_busy"] is not None]
        runs.append(steady(recs, target, r.steady_share) | {"gpu_busy": sum(busy) / len(busy) if busy else None})
    return {
        "max_num_seqs": target,
        "runs": runs,
        "engine_start_s": max(x["engine_start_s"] for x in results),
        "ready_at": max(x["ready_at"] for x in results),
    } | headline(runs)
