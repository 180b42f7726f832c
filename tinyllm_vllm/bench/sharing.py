"""Several engines side by side on one GPU, each on 1/k of the requests and of the memory, timed in lockstep.

One engine of a 92M model is bound by its own host work (a py-spy profile on an H100: its engine core
thread busy 84% of the time, scheduling and bookkeeping), so k engines, each with its own processes
and CPU cores, serve more. The engines start one after
another (engines started at the same moment on one GPU failed in vLLM's start-up, 2 of 3 tries on
an H200), warm up, and then run each repeat together; a repeat lasts as long as its slowest engine.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile

from . import engines


def run_engines_sharing_gpu(spec: dict, k: int) -> dict:
    """``spec`` as for ``engines.run_engine`` (a vLLM engine); returns the combined result."""
    args = dict(spec["engine_args"])
    args["gpu_memory_utilization"] = args.get("gpu_memory_utilization", 0.8) / k
    logs = [tempfile.TemporaryFile("w+") for _ in range(k)]
    procs: list[subprocess.Popen] = []

    def failure(i: int, what: str) -> RuntimeError:
        logs[i].seek(0)
        return RuntimeError(
            f"engine {i + 1}/{k} sharing the GPU {what}:\n" + "\n".join(logs[i].read().splitlines()[-30:])
        )

    try:
        for i, log in enumerate(logs):
            procs.append(engines.start_lockstep(spec | {"engine_args": args, "shard": [i, k]}, log))
            if not engines.ready(procs[i]):
                raise failure(i, f"exited with code {procs[i].wait()}")
        for r in range(spec.get("repeats", 1)):
            for i in range(k):
                if r > 0 and not engines.ready(procs[i]):
                    raise failure(i, f"exited with code {procs[i].wait()}")
            for p in procs:  # every engine warmed up and waiting
                engines.go(p)
        results = []
        for i, p in enumerate(procs):
            result = engines.result_of(p)
            if result is None:
                raise failure(i, f"failed with exit code {p.returncode}")
            results.append(result)
    finally:
        for p in procs:
            engines.stop(p)
        for log in logs:
            log.close()
    runs = []
    for j in range(spec.get("repeats", 1)):
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
            }
        )
    return {
        "engines": k,
        "runs": runs,
        "useful_tok_s": statistics.median(r["useful_tok_s"] for r in runs),
        "requests_s": statistics.median(r["requests_s"] for r in runs),
        "engine_start_s": max(r["engine_start_s"] for r in results),
    }
