"""The process of one benchmark engine: ``python -m tinyllm_vllm.bench.engine_main`` reads an ``EngineSpec``
as JSON on stdin, runs it (a vLLM engine from ``engines``, a transformers baseline from ``hf_engines``) and
prints ``{"result": ...}`` last (``engines.run_engine`` and ``engines.start_lockstep`` start it)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from tinyllm_vllm.bench.engines import EngineSpec, run_vllm, run_vllm_steady


def worker(spec: EngineSpec) -> dict:
    """Run one engine described by ``spec`` (what ``run_engine`` passes on stdin)."""
    from tinyllm_vllm.bench.workload import read_jsonl

    if spec.rule and spec.engine in ("plugin", "qwen2"):
        return run_vllm_steady(spec)
    if spec.rule:
        from tinyllm_vllm.bench.hf_engines import run_transformers_steady

        return run_transformers_steady(spec)

    from tinyllm_vllm.bench.engines import _start_llm
    from tinyllm_vllm.bench.hf_engines import _hf_model, run_transformers_cb, run_transformers_static

    workloads = []
    for path in (spec.workload, *spec.also):
        rows = read_jsonl(path)
        if spec.shard:  # one of several engines sharing the GPU: every k-th request
            i, k = spec.shard
            rows = rows[i::k]
        workloads.append(rows)
    # the engine starts once; every workload is timed on it
    if spec.engine in ("transformers_static", "transformers_cb"):
        run = run_transformers_static if spec.engine == "transformers_static" else run_transformers_cb
        loaded = _hf_model(spec.model, spec.engine_args.get("dtype"))
        results = [run(spec, rows, loaded) for rows in workloads]
    else:
        started = _start_llm(spec)
        first = run_vllm(spec, workloads[0], started)
        later = replace(spec, as_vllm_bench=False)  # vllm bench's calls are timed on the first workload only
        results = [first] + [run_vllm(later, rows, started) for rows in workloads[1:]]
    return results[0] | {"also": results[1:]} if spec.also else results[0]


if __name__ == "__main__":
    print(json.dumps({"result": worker(EngineSpec.from_json(sys.stdin.readline()))}), flush=True)
