"""vLLM's own ``vllm bench throughput``, run on the kit's workloads (a cross-check of the offline harness).

It reads a workload in the ShareGPT layout (``workload.to_sharegpt``, written beside the JSONL the
kit's harness reads), so it sends the same requests: the same prompts, each asking for its own
number of tokens (``ignore_eos``). ``vllm bench`` shuffles them with its seed; the set is the same.
Serving loads use the kit's own barrier-started clients (``load``): several ``vllm bench serve``
processes cannot be started together, and a level whose clients did not overlap measures less load
than it claims.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from tinyllm_vllm.bench.engines import bench_logs
from tinyllm_vllm.bench.workload import read_jsonl
from tinyllm_vllm.runtime import logs, procs
from tinyllm_vllm.runtime.server import vllm_command
from tinyllm_vllm.settings import to_flags


def throughput(
    model: str | Path, workload: str | Path, engine_args: dict[str, Any], num_warmups: int = 0, timeout: float = 1800
) -> dict:
    """``vllm bench throughput`` on the workload with the same engine options; parsed results."""
    rows = read_jsonl(workload)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "throughput.json"
        cmd = vllm_command(
            "bench",
            "throughput",
            "--model",
            str(model),
            "--dataset-name",
            "sharegpt",
            "--dataset-path",
            str(sharegpt(workload)),
            "--num-prompts",
            str(len(rows)),
            "--num-warmups",
            str(num_warmups),
            "--output-json",
            str(out),
            *to_flags({k: v for k, v in engine_args.items() if k != "seed"}),
        )
        log = logs.new_log_file(bench_logs(), "vllm-bench-throughput")  # kept: a failure's log outlives the run
        t = time.perf_counter()
        code = procs.run_group(cmd, log, timeout, logs.own_logging_env())
        wall = time.perf_counter() - t
        printed = log.read_text(errors="replace")
        if code != 0 or not out.exists():
            return {
                "error": f"vllm bench throughput failed (exit {code}, log: {log}):\n{logs.tail(log, 20)}",
                "command": cmd,
            }
        result = json.loads(out.read_text())
    useful = sum(r["output_tokens"] for r in rows)
    line = next((ln for ln in printed.splitlines() if ln.startswith("Throughput:")), "")
    return {
        "command": cmd,
        "printed": line,
        "elapsed_s": result["elapsed_time"],
        "wall_s": wall,
        "useful_tok_s": useful / result["elapsed_time"],
        "requests_s": result["requests_per_second"],
        "total_tok_s": result["tokens_per_second"],
        "num_warmups": num_warmups,
    }


def sharegpt(workload: str | Path) -> Path:
    """The ShareGPT-layout file written beside a workload's JSONL (``compare.prepare_workload``)."""
    return Path(workload).with_suffix(".sharegpt.json")
