"""One engine per subprocess, timed on a workload: ``run_engine(spec)``.

GPU memory is not reliably freed inside a process, and one engine's numbers must not leak into
the next, so each engine runs in a fresh ``python -m tinyllm_vllm.bench.engines`` that reads its
spec as JSON on stdin and prints ``{"result": ...}`` last. Engines:

* ``plugin``  vLLM with the TinyLLM plugin;  ``qwen2``  vLLM's own Qwen2 class on the same weights;
* ``transformers_static``  ``generate`` in left-padded static batches at the best batch size;
* ``transformers_cb``  transformers' continuous batching (its paged-attention manager).

Every engine is timed warm (after a warm-up) with greedy decoding and per-request ``max_tokens``.
vLLM engines produce text (``detokenize``), as a server would. A spec with ``"as_vllm_bench": true``
first times the calls ``vllm bench throughput`` makes (text prompts, temperature 1.0, no warm-up), so
the two can be compared within one engine.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any

from .. import procs

ENGINES = ("plugin", "qwen2", "transformers_static", "transformers_cb")
VLLM_ENGINES = ("plugin", "qwen2")


def _tokenize(model: str, rows: list[dict]) -> list[list[int]]:
    from transformers import AutoTokenizer

    import tinyllm_vllm.config  # noqa: F401  (registers model_type tinyllm)

    tok = AutoTokenizer.from_pretrained(model)
    return [tok(r["prompt"])["input_ids"] for r in rows]


def _timed(label: str, fn: Any, useful: int, requests: int, sync: Any = lambda: None) -> dict:
    sync()
    t = time.perf_counter()
    generated = fn()
    sync()
    elapsed = time.perf_counter() - t
    return {
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


def run_vllm(spec: dict, rows: list[dict]) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    args = dict(spec["engine_args"], model_impl="vllm")
    if spec["engine"] == "qwen2":
        # vLLM's in-tree Qwen2 class on the very same weights: TinyLLM's layout is Qwen2's
        args["hf_overrides"] = {"architectures": ["Qwen2ForCausalLM"]}
    t0 = time.perf_counter()
    llm = LLM(spec["model"], **args)
    start_s = time.perf_counter() - t0
    useful = sum(r["output_tokens"] for r in rows)
    runs = []

    def generate(prompts: list, **sampling: Any) -> int:
        params = [
            SamplingParams(max_tokens=r["output_tokens"], ignore_eos=True, **sampling) for r in rows[: len(prompts)]
        ]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    if spec.get("as_vllm_bench"):
        texts = [r["prompt"] for r in rows]
        for label in ("as vllm bench, first call", "as vllm bench, warm"):
            runs.append(_timed(label, lambda: generate(texts, temperature=1.0, top_p=1.0), useful, len(rows)))
    ids = [TokensPrompt(prompt_token_ids=p) for p in _tokenize(spec["model"], rows)]
    generate(ids[:8], temperature=0)  # warm-up
    for _ in range(spec.get("repeats", 1)):
        if spec.get("lockstep"):
            _wait_for_go()
        runs.append(_timed("harness", lambda: generate(ids, temperature=0), useful, len(rows)))
    timed = [r for r in runs if r["label"] == "harness"]
    return {
        "engine_start_s": start_s,
        "runs": runs,
        "useful_tok_s": statistics.median(r["useful_tok_s"] for r in timed),
        "requests_s": statistics.median(r["requests_s"] for r in timed),
    }


def _hf_model(model: str, dtype: str | None) -> tuple[Any, str, Any]:
    import torch

    from ..hf_model import TinyllmForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype in ("auto", None):
        dtype = "bfloat16" if device == "cuda" else "float32"
    m = TinyllmForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return m, device, sync


def run_transformers_static(spec: dict, rows: list[dict]) -> dict:
    """Left-padded static batches, each run until its longest request; the best batch size wins."""
    import torch

    m, device, sync = _hf_model(spec["model"], spec["engine_args"].get("dtype"))
    prompts = _tokenize(spec["model"], rows)
    useful_all = sum(r["output_tokens"] for r in rows)

    def run(lo: int, hi: int) -> int:
        batch = prompts[lo:hi]
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        steps = max(r["output_tokens"] for r in rows[lo:hi])
        out = m.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        return (out.shape[1] - width) * out.shape[0]

    probe = {}
    with torch.inference_mode():
        for bs in spec["hf_batch_sizes"]:
            bs = min(bs, len(rows))
            run(0, min(bs, 4))  # warm-up at a small size (kernels, allocator)
            useful = sum(r["output_tokens"] for r in rows[:bs])
            probe[bs] = _timed(f"probe batch {bs}", lambda bs=bs: run(0, bs), useful, bs, sync)["useful_tok_s"]
        best = max(probe, key=probe.get)
        result = _timed(
            f"batch {best}",
            lambda: sum(run(i, i + best) for i in range(0, len(rows), best)),
            useful_all,
            len(rows),
            sync,
        )
    return {
        "batch_size": best,
        "probe_useful_tok_s": {str(k): round(v, 1) for k, v in probe.items()},
        "runs": [result],
        "useful_tok_s": result["useful_tok_s"],
        "requests_s": result["requests_s"],
        "generated_tokens": result["generated_tokens"],
    }


def run_transformers_cb(spec: dict, rows: list[dict]) -> dict:
    """transformers' continuous batching: requests join and leave the running batch as they finish."""
    from transformers import GenerationConfig

    m, device, sync = _hf_model(spec["model"], spec["engine_args"].get("dtype"))
    if not hasattr(m, "continuous_batching_context_manager"):
        import transformers

        return {
            "error": f"transformers {transformers.__version__} has no continuous batching "
            f"(GenerationMixin.continuous_batching_context_manager)"
        }
    prompts = _tokenize(spec["model"], rows)
    config = GenerationConfig(
        max_new_tokens=max(r["output_tokens"] for r in rows), do_sample=False, eos_token_id=-1, pad_token_id=0
    )

    def run(manager: Any, n: int, tag: str) -> int:
        for i in range(n):
            manager.add_request(
                prompts[i], request_id=f"{tag}{i}", max_new_tokens=rows[i]["output_tokens"], eos_token_id=-1
            )
        done, generated = 0, 0
        while done < n:
            out = manager.get_result(timeout=5)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching stopped before finishing")
                continue
            if out.is_finished():
                done += 1
                generated += len(out.generated_tokens)
        return generated

    useful = sum(r["output_tokens"] for r in rows)
    # no inference_mode here: the manager's own thread updates its tensors in place
    with m.continuous_batching_context_manager(generation_config=config, block=True, timeout=30) as manager:
        run(manager, min(8, len(rows)), "warm-up")
        result = _timed("continuous batching", lambda: run(manager, len(rows), "r"), useful, len(rows), sync)
    return {
        "runs": [result],
        "useful_tok_s": result["useful_tok_s"],
        "requests_s": result["requests_s"],
        "attn_implementation": getattr(m.config, "_attn_implementation", None),
    }


def worker(spec: dict) -> dict:
    """Run one engine described by ``spec`` (what ``run_engine`` passes on stdin)."""
    from .workload import read_jsonl

    rows = read_jsonl(spec["workload"])
    if "shard" in spec:  # one of several engines sharing the GPU: every k-th request
        i, k = spec["shard"]
        rows = rows[i::k]
    run = {"transformers_static": run_transformers_static, "transformers_cb": run_transformers_cb}.get(
        spec["engine"], run_vllm
    )
    return run(spec, rows)


def start_lockstep(spec: dict, stderr: Any) -> subprocess.Popen:
    """An engine process that warms up, says READY and starts each timed run when sent GO (``ready``, ``go``).

    It leads its own process group, so its engine core goes down with it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinyllm_vllm.bench.engines"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )
    proc.stdin.write(json.dumps(spec | {"lockstep": True}) + "\n")
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


def run_engine(spec: dict, timeout: float = 1800) -> dict:
    """Run ``worker(spec)`` in a fresh Python process; a failure is returned as ``{"error": ...}``."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tinyllm_vllm.bench.engines"],
            input=json.dumps(spec) + "\n",
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"{spec['engine']}: no result within {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"result"')]
    if proc.returncode != 0 or not lines:
        return {
            "error": f"{spec['engine']} failed (exit {proc.returncode}): " + "\n".join(proc.stderr.splitlines()[-20:])
        }
    return json.loads(lines[-1])["result"]


if __name__ == "__main__":
    print(json.dumps({"result": worker(json.loads(sys.stdin.readline()))}), flush=True)
