"""The process of one benchmark engine: ``python -m tinyllm_vllm.bench.engine_main`` reads an ``EngineSpec``
as JSON on stdin, runs it (a vLLM engine from ``engines``, a transformers baseline from ``hf_engines``) and
prints ``{"result": ...}`` last (``engines.run_engine`` and ``engines.start_lockstep`` start it)."""

from __future__ import annotations

import json
import sys

from tinyllm_vllm.bench.engines import EngineSpec, run_vllm, run_vllm_steady


def worker(spec: EngineSpec) -> dict:
    """Run one engine described by ``spec`` (what ``run_engine`` passes on stdin)."""
    from tinyllm_vllm.bench.workload import read_jsonl

    if spec.rule and spec.engine in ("plugin", "qwen2"):
        return run_vllm_steady(spec)
    if spec.rule:
        from tinyllm_vllm.bench.hf_engines import run_transformers_steady

        return run_transformers_steady(spec)

    rows = read_jsonl(spec.workload)
    if spec.shard:  # one of several engines sharing the GPU: every k-th request
        i, k = spec.shard
        rows = rows[i::k]
    from tinyllm_vllm.bench.hf_engines import run_transformers_cb, run_transformers_static

    run = {"transformers_static": run_transformers_static, "transformers_cb": run_transformers_cb}.get(
        spec.engine, run_vllm
    )
    return run(spec, rows)


if __name__ == "__main__":
    print(json.dumps({"result": worker(EngineSpec.from_json(sys.stdin.readline()))}), flush=True)
