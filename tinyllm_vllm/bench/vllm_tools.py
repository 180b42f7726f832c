"""vLLM's own benchmark tools, run on the kit's workloads: ``vllm bench throughput`` and ``vllm bench serve``.

Both read a workload in the ShareGPT layout (``workload.to_sharegpt``, written beside the JSONL the
kit's harness reads), so they send the same requests: the same prompts, each asking for its own
number of tokens (``ignore_eos``). ``vllm bench`` shuffles them with its seed; the set is the same.
``vllm bench serve`` is one Python process with an asyncio client; where one client
cannot keep up with a fast endpoint, ``serve`` runs several client processes, each with its share
of the requests and of the concurrency, and merges their per-request records.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ..server import vllm_command
from ..settings import to_flags
from .workload import read_jsonl


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
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t
        if proc.returncode != 0 or not out.exists():
            return {
                "error": f"vllm bench throughput failed (exit {proc.returncode}):\n"
                + "\n".join((proc.stdout + proc.stderr).splitlines()[-20:]),
                "command": cmd,
            }
        result = json.loads(out.read_text())
    useful = sum(r["output_tokens"] for r in rows)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("Throughput:")), "")
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


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def serve(
    url: str,
    model_name: str,
    tokenizer: str | Path,
    workload: str | Path,
    concurrency: int,
    clients: int = 1,
    endpoint: str = "/v1/completions",
    timeout: float = 1800,
) -> dict:
    """``vllm bench serve`` against a running endpoint (``url``: its root, without /v1) at ``concurrency``
    requests in flight, from ``clients`` processes. Returns throughput, TTFT / TPOT / ITL percentiles and
    every client's raw JSON (without the generated texts)."""
    rows = json.loads(sharegpt(workload).read_text())
    clients = max(1, min(clients, concurrency, len(rows)))
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(clients):
            part = Path(tmp) / f"part{i}.json"
            part.write_text(json.dumps(rows[i::clients], ensure_ascii=False))
            cmd = vllm_command(
                "bench",
                "serve",
                "--backend",
                "openai",
                "--base-url",
                url,
                "--endpoint",
                endpoint,
                "--model",
                model_name,
                "--tokenizer",
                str(tokenizer),
                "--dataset-name",
                "sharegpt",
                "--dataset-path",
                str(part),
                "--num-prompts",
                str(len(rows[i::clients])),
                "--ignore-eos",
                "--max-concurrency",
                str(max(1, concurrency // clients)),
                "--request-rate",
                "inf",
                "--percentile-metrics",
                "ttft,tpot,itl,e2el",
                "--metric-percentiles",
                "50,99",
                "--save-result",
                "--save-detailed",
                "--result-dir",
                tmp,
                "--result-filename",
                f"client{i}.json",
                "--disable-tqdm",
            )
            procs.append(
                (
                    cmd,
                    subprocess.Popen(
                        cmd,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                        env=os.environ | {"PYTHONUNBUFFERED": "1"},
                    ),
                )
            )
        raw = []
        for i, (cmd, p) in enumerate(procs):
            out, _ = p.communicate(timeout=timeout)
            path = Path(tmp) / f"client{i}.json"
            if p.returncode != 0 or not path.exists():
                for _, other in procs:
                    other.kill()
                return {
                    "error": f"vllm bench serve failed (exit {p.returncode}):\n" + "\n".join(out.splitlines()[-20:]),
                    "command": cmd,
                }
            result = json.loads(path.read_text())
            result.pop("generated_texts", None)  # the replies themselves: not needed, and large
            raw.append(result)
    return merge(raw, concurrency, clients) | {"command": procs[0][0], "raw": raw}


def span(raw: list[dict]) -> tuple[float, float]:
    """(wall time from the first client's start to the last client's end, spread of the clients' starts).

    Client processes start seconds apart (each imports vLLM and tokenizes its requests; seen: up to 22 s on
    a busy 16-core machine), so the longest client's own duration undercounts the run: throughput over it
    was overstated by up to 41% (seen on DP=2). ``start_times`` are ``time.perf_counter()`` readings, one
    clock for every process on the machine."""
    if not all(r.get("start_times") for r in raw):
        return max(r["duration"] for r in raw), 0.0
    starts = [min(r["start_times"]) for r in raw]
    ends = [s + r["duration"] for s, r in zip(starts, raw, strict=True)]
    return max(ends) - min(starts), max(starts) - min(starts)


def merge(raw: list[dict], concurrency: int, clients: int) -> dict:
    """One result from several clients' detailed JSONs: per-request records pooled, throughput over the wall
    time from the first client's start to the last one's end (``span``)."""
    duration, spread = span(raw)
    ttft = [t * 1000 for r in raw for t, err in zip(r["ttfts"], r["errors"], strict=True) if not err]
    itl = [x * 1000 for r in raw for per in r["itls"] for x in per]
    tpot = [statistics.fmean(per) * 1000 for r in raw for per in r["itls"] if per]
    e2e = [
        statistics.fsum(per) * 1000 + t
        for r in raw
        for per, t in zip(r["itls"], [t * 1000 for t in r["ttfts"]], strict=True)
    ]
    completed = sum(r["completed"] for r in raw)
    output = sum(r["total_output_tokens"] for r in raw)
    return {
        "concurrency": concurrency,
        "clients": clients,
        "completed": completed,
        "failed": sum(r.get("failed", 0) for r in raw),
        "duration_s": duration,
        "client_start_spread_s": spread,
        "output_tok_s": output / duration,
        "requests_s": completed / duration,
        "ttft_ms_p50": _percentile(ttft, 50),
        "ttft_ms_p99": _percentile(ttft, 99),
        "tpot_ms_p50": _percentile(tpot, 50),
        "tpot_ms_p99": _percentile(tpot, 99),
        "itl_ms_p50": _percentile(itl, 50),
        "itl_ms_p99": _percentile(itl, 99),
        "e2e_ms_p50": _percentile(e2e, 50),
        "e2e_ms_p99": _percentile(e2e, 99),
    }
