"""One engine per subprocess, timed on a workload: ``run_engine(spec)``.

GPU memory is not reliably freed inside a process, and one engine's numbers must not leak into
the next, so each engine runs in a fresh ``python -m tinyllm_vllm.bench.engine_main`` that reads its
spec (``EngineSpec``) as JSON on stdin and prints ``{"result": ...}`` last. Engines:

* ``plugin``  vLLM with the TinyLLM plugin;  ``qwen2``  vLLM's own Qwen2 class on the same weights;
* ``transformers_static``  ``generate`` in left-padded static batches at the best batch size;
* ``transformers_cb``  transformers' continuous batching (its paged-attention manager).

Every engine is timed warm (after a warm-up) with greedy decoding and per-request ``max_tokens``.
vLLM engines produce text (``detokenize``), as a server would. A spec with ``"as_vllm_bench": true``
first times the calls ``vllm bench throughput`` makes (text prompts, temperature 1.0, no warm-up), so
the two can be compared within one engine.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tinyllm_vllm.runtime import logs, procs

ENGINES = ("plugin", "qwen2", "transformers_static", "transformers_cb")


@dataclass(frozen=True)
class EngineSpec(procs.ChildSpec):
    """What one engine process runs: the typed form of every bench path's engine configuration."""

    model: str
    workload: str
    engine: str = "plugin"
    engine_args: dict[str, Any] = field(default_factory=dict)  # vllm.LLM keyword arguments
    repeats: int = 1
    hf_batch_sizes: tuple[int, ...] = (64, 256, 1024)
    hf_caches: tuple[str, ...] = ("dynamic",)  # transformers: "static" is the static cache with compile
    as_vllm_bench: bool = False
    shard: tuple[int, int] | None = None  # (i, k): every k-th request from the i-th, for k engines on one GPU
    lockstep: bool = False
    # more workloads timed in the same engine process after ``workload`` (one engine start for all of them);
    # their results come back under the result's ``also``, in order
    also: tuple[str, ...] = ()
    # steady state (``rule.Rule`` and a ``workload.ChatLike`` as dicts): timed runs fed from an endless request
    # stream until the rule holds, instead of one pass over ``workload``
    rule: dict[str, Any] | None = None
    stream: dict[str, Any] | None = None


VLLM_ENGINES = ("plugin", "qwen2")


def bench_logs() -> Path:
    """Where the benchmark engines log: the kit's log folder (``TINYLLM_HOME``)."""
    from tinyllm_vllm.settings import Settings

    return Settings.from_env().logs


def _env() -> dict[str, str]:
    from tinyllm_vllm.runtime.startup import cache_env
    from tinyllm_vllm.settings import Settings

    # vLLM logs to stdout by default, which is the pipe that carries an engine's result: its log goes to the file.
    # The compile cache is the kit's, so servers started after the engines reuse what they compiled.
    home = Settings.from_env().home
    return os.environ | cache_env(home) | {"VLLM_LOGGING_STREAM": "ext://sys.stderr"}


WARM_UP = 512  # requests every vLLM engine runs before it is timed (the first traffic of an engine is slower)


def _tokenize(model: str, rows: list[dict]) -> list[list[int]]:
    from transformers import AutoTokenizer

    import tinyllm_vllm.model.config  # noqa: F401  (registers model_type tinyllm)

    tok = AutoTokenizer.from_pretrained(model)
    return [tok(r["prompt"])["input_ids"] for r in rows]


def _timed(label: str, fn: Any, useful: int, requests: int, sync: Any = lambda: None) -> dict:
    from tinyllm_vllm.bench.gpubusy import GpuBusy

    sync()
    with GpuBusy() as busy:
        t = time.perf_counter()
        generated = fn()
        sync()
        elapsed = time.perf_counter() - t
    return {
        "gpu_busy": busy.mean,
        "label": label,
        "elapsed_s": elapsed,
        "useful_tokens": useful,
        "generated_tokens": generated,
        "useful_tok_s": useful / elapsed,
        "requests_s": requests / elapsed,
    }


def _wait_for_go() -> None:
    # lockstep with the other engines on this GPU: say ready, start when the parent says so
    print("READY", flush=True)
    sys.stdin.readline()


def _start_llm(spec: EngineSpec) -> tuple[Any, float, float]:
    """The spec's vLLM engine, the seconds its start took, and when (``time.time()``) it was ready."""
    from tinyllm_vllm.runtime.offline import new_llm

    args = dict(spec.engine_args, model_impl="vllm")
    if spec.engine == "qwen2":
        # vLLM's in-tree Qwen2 class on the very same weights: TinyLLM's layout is Qwen2's
        args["hf_overrides"] = {"architectures": ["Qwen2ForCausalLM"]}
    t0 = time.perf_counter()
    llm = new_llm(spec.model, args)
    return llm, time.perf_counter() - t0, time.time()


def run_vllm(spec: EngineSpec, rows: list[dict], started: tuple[Any, float, float] | None = None) -> dict:
    """One pass over ``rows`` (after a warm-up), ``spec.repeats`` times, on the engine ``started`` (``_start_llm``)
    or on one started here."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm, start_s, ready_at = started or _start_llm(spec)
    useful = sum(r["output_tokens"] for r in rows)
    runs = []

    def generate(prompts: list, **sampling: Any) -> int:
        params = [
            SamplingParams(max_tokens=r["output_tokens"], ignore_eos=True, **sampling) for r in rows[: len(prompts)]
        ]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    if spec.as_vllm_bench:
        texts = [r["prompt"] for r in rows]
        for label in ("as vllm bench, first call", "as vllm bench, warm"):
            runs.append(_timed(label, lambda: generate(texts, temperature=1.0, top_p=1.0), useful, len(rows)))
    ids = [TokensPrompt(prompt_token_ids=p) for p in _tokenize(spec.model, rows)]
    generate(ids[:WARM_UP], temperature=0)  # every engine is warmed the same way
    for _ in range(spec.repeats):
        if spec.lockstep:
            _wait_for_go()
        runs.append(_timed("harness", lambda: generate(ids, temperature=0), useful, len(rows)))
    timed = [r for r in runs if r["label"] == "harness"]
    return {
        "engine_start_s": start_s,
        "ready_at": ready_at,
        "runs": runs,
        "useful_tok_s": statistics.median(r["useful_tok_s"] for r in timed),
        "requests_s": statistics.median(r["requests_s"] for r in timed),
    }


def _stream(spec: EngineSpec, vocab: int, prefix: tuple[int, ...], seed_offset: int, repeat: int) -> Any:
    """This engine's requests of the stream (its shard), as ``hf_engines`` and ``feed.keep_full`` take them:
    ``(index, prompt ids, reply length)``. Each repeat draws other requests; the warm-up another seed."""
    from tinyllm_vllm.bench.workload import ChatLike, token_request

    dist = replace(ChatLike(**spec.stream), seed=spec.stream["seed"] + seed_offset)
    i, k = spec.shard or (0, 1)
    m = 0
    while True:
        idx = repeat * 10_000_000 + i + k * m
        m += 1
        yield (idx, *token_request(dist, vocab, idx, prefix))


def run_vllm_steady(spec: EngineSpec) -> dict:
    """A vLLM engine timed by the rule: kept full (``feed.keep_full``) on the request stream, each repeat until
    ``min_seconds`` and ``min_factor`` x its ``max_num_seqs`` requests; finished replies decoded to text."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tinyllm_vllm.bench.gpubusy import GpuBusy
    from tinyllm_vllm.rule import Rule, steady
    from tinyllm_vllm.runtime import feed

    llm, start_s, ready_at = _start_llm(spec)
    rule = Rule(**spec.rule)
    tok = llm.get_tokenizer()
    prefix, vocab = tuple(tok("")["input_ids"]), len(tok)
    target = feed.max_num_seqs(llm)

    def requests(seed_offset: int, repeat: int) -> Any:
        for idx, ids, reply in _stream(spec, vocab, prefix, seed_offset, repeat):
            params = SamplingParams(max_tokens=reply, ignore_eos=True, temperature=0, detokenize=False)
            yield idx, TokensPrompt(prompt_token_ids=ids), params

    feed.keep_full(llm, itertools.islice(requests(1, 0), 2 * target), lambda d: None)  # warm-up: other requests
    runs = []
    for j in range(rule.repeats):
        if spec.lockstep:
            _wait_for_go()
        records: list[list[float]] = []

        def done(d: feed.Done, records: list[list[float]] = records) -> None:
            tok.decode(d.token_ids, skip_special_tokens=True)  # the text a user gets, as the batch writes it
            records.append([d.sent, d.end, len(d.token_ids)])

        with GpuBusy() as busy:
            t = time.time()
            feed.keep_full(llm, requests(0, j), done, keep_adding=rule.keep_adding(t, target, time.time))
        recs = [{"sent": a, "end": b, "tokens": n} for a, b, n in records]
        runs.append(steady(recs, target, rule.steady_share) | {"gpu_busy": busy.mean, "records": records})
    return {
        "engine_start_s": start_s,
        "ready_at": ready_at,
        "max_num_seqs": target,
        "runs": runs,
    }


def start_lockstep(spec: EngineSpec, log: Path) -> subprocess.Popen:
    """An engine process that warms up, says READY and starts each timed run when sent GO (``ready``, ``go``).

    It runs under the kit's watchdog in its own process group (``procs``), so its engine core goes down
    with it, also when this process dies; its log goes to ``log``."""
    proc = procs.start_group([sys.executable, "-m", "tinyllm_vllm.bench.engine_main"], log, _env(), pipes=True)
    proc.stdin.write(replace(spec, lockstep=True).to_json() + "\n")
    proc.stdin.flush()
    return proc


def ready(proc: subprocess.Popen) -> bool:
    """Wait until a lockstep engine says READY; False if it exited first."""
    while line := proc.stdout.readline():
        if line.strip() == "READY":
            return True
    return False


def go(proc: subprocess.Popen) -> None:
    proc.stdin.write("GO\n")
    proc.stdin.flush()


def stop(proc: subprocess.Popen) -> None:
    """Stop a lockstep engine at once, with its engine core (its process group), and wait until all are gone."""
    procs.stop_group(proc, grace=0)


def result_of(proc: subprocess.Popen) -> dict | None:
    """A lockstep engine's result once it has finished (None if it gave none)."""
    lines = [ln for ln in proc.stdout.read().splitlines() if ln.startswith('{"result"')]
    return json.loads(lines[-1])["result"] if proc.wait() == 0 and lines else None


def record_start(home: Path | None, what: str, launched: float, result: dict, log: Path) -> None:
    """Record a vLLM engine's start (launch to ready) with the kit's other starts in ``home``, if given."""
    if home and "ready_at" in result:
        from tinyllm_vllm.runtime.startup import record

        record(home, what, result["ready_at"] - launched, log, ready_at=result["ready_at"])


def run_engine(spec: EngineSpec, timeout: float = 1800, log: Path | None = None, home: Path | None = None) -> dict:
    """Run ``worker(spec)`` in a fresh Python process under the watchdog; a failure (or no result within
    ``timeout``, after which its whole group is stopped) is returned as ``{"error": ...}``. With ``home``, a
    vLLM engine's start is recorded there (``startup.record``)."""
    log = log or logs.new_log_file(bench_logs(), f"bench-{spec.engine}")
    launched = time.time()
    proc = procs.start_group([sys.executable, "-m", "tinyllm_vllm.bench.engine_main"], log, _env(), pipes=True)
    try:
        out, _ = proc.communicate(spec.to_json() + "\n", timeout=timeout)
    except subprocess.TimeoutExpired:
        procs.stop_group(proc, grace=5)
        return {"error": f"{spec.engine}: no result within {timeout:.0f} s (log: {log})"}
    except BaseException:
        procs.stop_group(proc, grace=2)
        raise
    lines = [ln for ln in out.splitlines() if ln.startswith('{"result"')]
    if proc.returncode != 0 or not lines:
        return {"error": f"{spec.engine} failed (exit {proc.returncode}): {logs.tail(log, 20)}"}
    result = json.loads(lines[-1])["result"]
    record_start(home, f"benchmark engine ({spec.engine})", launched, result, log)
    return result
