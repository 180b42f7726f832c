"""The transformers baselines, each run by ``engines.worker`` in a process of its own:

* ``transformers_static``  ``generate`` in left-padded static batches: the dynamic cache, and the static
  cache with transformers' compiled decode step, at each batch size; the best one is timed on every request;
* ``transformers_cb``  transformers' continuous batching (its paged-attention manager).
"""

from __future__ import annotations

from typing import Any

from tinyllm_vllm.bench.engines import EngineSpec, _timed, _tokenize


def _hf_model(model: str, dtype: str | None) -> tuple[Any, str, Any]:
    import torch

    from tinyllm_vllm.model.hf_model import TinyllmForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype in ("auto", None):
        dtype = "bfloat16" if device == "cuda" else "float32"
    m = TinyllmForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return m, device, sync


def _static_batch(m: Any, prompts: list[list[int]], width: int, steps: int, cache: str, device: str) -> int:
    """One left-padded batch through ``generate`` for exactly ``steps`` tokens; returns the tokens generated."""
    import torch

    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    extra = {"cache_implementation": "static"} if cache == "static" else {}  # transformers compiles its decode step
    out = m.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        **extra,
    )
    return (out.shape[1] - width) * out.shape[0]


def run_transformers_static(spec: EngineSpec, rows: list[dict], loaded: tuple[Any, str, Any] | None = None) -> dict:
    """Left-padded static batches, each run until its longest request; the best batch size wins. On the model
    ``loaded`` (``_hf_model``) or on one loaded here."""
    import torch

    m, device, sync = loaded or _hf_model(spec.model, spec.engine_args.get("dtype"))
    prompts = _tokenize(spec.model, rows)
    useful_all = sum(r["output_tokens"] for r in rows)

    # static cache: every batch padded to one width and run for one length, so the compiled graphs fit all
    # of them (a new shape would compile again); the longest reply is in nearly every batch of >= 256 anyway
    width_all = max(map(len, prompts))
    steps_all = max(r["output_tokens"] for r in rows)

    def run(lo: int, hi: int, cache: str = "dynamic") -> int:
        batch = prompts[lo:hi]
        static = cache == "static"
        width = width_all if static else max(map(len, batch))
        steps = steps_all if static else max(r["output_tokens"] for r in rows[lo:hi])
        return _static_batch(m, batch, width, steps, cache, device)

    probe = {}
    with torch.inference_mode():
        for cache in spec.hf_caches:
            for bs in spec.hf_batch_sizes:
                bs = min(bs, len(rows))
                run(0, bs if cache == "static" else min(bs, 4), cache)  # warm-up (static: compiles its shapes)
                useful = sum(r["output_tokens"] for r in rows[:bs])
                timed = _timed(f"probe {cache} batch {bs}", lambda bs=bs, c=cache: run(0, bs, c), useful, bs, sync)
                probe[(cache, bs)] = timed["useful_tok_s"]
        best_cache, best = max(probe, key=probe.get)
        result = _timed(
            f"{best_cache} cache, batch {best}",
            lambda: sum(run(i, i + best, best_cache) for i in range(0, len(rows), best)),
            useful_all,
            len(rows),
            sync,
        )
    return {
        "batch_size": best,
        "cache": best_cache,
        "probe_useful_tok_s": {f"{c} {k}": round(v, 1) for (c, k), v in probe.items()},
        "runs": [result],
        "useful_tok_s": result["useful_tok_s"],
        "requests_s": result["requests_s"],
        "generated_tokens": result["generated_tokens"],
    }


def run_transformers_cb(spec: EngineSpec, rows: list[dict], loaded: tuple[Any, str, Any] | None = None) -> dict:
    """transformers' continuous batching: requests join and leave the running batch as they finish."""
    from transformers import GenerationConfig

    m, device, sync = loaded or _hf_model(spec.model, spec.engine_args.get("dtype"))
    if not hasattr(m, "continuous_batching_context_manager"):
        import transformers

        return {
            "error": f"transformers {transformers.__version__} has no continuous batching "
            f"(GenerationMixin.continuous_batching_context_manager)"
        }
    prompts = _tokenize(spec.model, rows)
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
    # the paged cache sized to the workload (every request at once): left to itself, transformers takes 90% of
    # the free memory, which on a CPU is the machine's RAM, and several processes of a run then exhaust it
    page = 256
    blocks = sum(-(-(len(p) + r["output_tokens"]) // page) for p, r in zip(prompts, rows, strict=True))
    kw: dict[str, Any] = {}
    try:
        from transformers import ContinuousBatchingConfig

        kw["continuous_batching_config"] = ContinuousBatchingConfig(page_size=page, num_blocks=blocks + 8)
    except ImportError:  # older transformers: its own sizing
        pass
    # no inference_mode here: the manager's own thread updates its tensors in place
    with m.continuous_batching_context_manager(generation_config=config, block=True, timeout=30, **kw) as manager:
        run(manager, min(8, len(rows)), "warm-up")
        result = _timed("continuous batching", lambda: run(manager, len(rows), "r"), useful, len(rows), sync)
    return {
        "runs": [result],
        "useful_tok_s": result["useful_tok_s"],
        "requests_s": result["requests_s"],
        "attn_implementation": getattr(m.config, "_attn_implementation", None),
    }


def run_transformers_steady(spec: EngineSpec) -> dict:
    """transformers at its best, timed by the rule: static batches of the best size (probed if several are
    given) drawn one after another from the request stream, until ``min_seconds`` and ``min_factor`` x the
    batch size of requests. Every batch is padded to the widest prompt and run for the longest reply the
    stream can ask for, as a static cache compiled once must be."""
    import time

    import torch
    from transformers import AutoTokenizer

    import tinyllm_vllm.model.config  # noqa: F401  (registers model_type tinyllm)
    from tinyllm_vllm.bench.engines import _stream
    from tinyllm_vllm.bench.gpubusy import GpuBusy
    from tinyllm_vllm.rule import Rule, steady

    m, device, sync = _hf_model(spec.model, spec.engine_args.get("dtype"))
    tok = AutoTokenizer.from_pretrained(spec.model)
    prefix, vocab = tuple(tok("")["input_ids"]), len(tok)
    rule = Rule(**spec.rule)
    width = spec.stream["prompt_range"][1] + len(prefix)
    steps = spec.stream["reply_max"]

    def batch(source: Any, bs: int, cache: str) -> tuple[list[int], float, float]:
        reqs = [next(source) for _ in range(bs)]
        sent = time.time()
        _static_batch(m, [p[-width:] for _, p, _ in reqs], width, steps, cache, device)
        sync()
        return [r for _, _, r in reqs], sent, time.time()

    probe: dict[tuple[str, int], float] = {}
    combos = [(c, bs) for c in spec.hf_caches for bs in spec.hf_batch_sizes]
    with torch.inference_mode():
        warm = _stream(spec, vocab, prefix, 1, 0)
        for cache, bs in combos:
            batch(warm, bs, cache)  # warm-up (static: compiles its shapes)
            if len(combos) > 1:
                replies, a, b = batch(warm, bs, cache)
                probe[(cache, bs)] = sum(replies) / (b - a)
        cache, bs = max(probe, key=probe.get) if probe else combos[0]
        runs = []
        for j in range(rule.repeats):
            source, records = _stream(spec, vocab, prefix, 0, j), []
            keep = rule.keep_adding(time.time(), bs, time.time)
            with GpuBusy() as busy:
                while keep(len(records)):
                    replies, a, b = batch(source, bs, cache)
                    records += [{"sent": a, "end": b, "tokens": r} for r in replies]
            runs.append(steady(records, bs, rule.steady_share) | {"gpu_busy": busy.mean})
    return {
        "batch_size": bs,
        "cache": cache,
        "probe_useful_tok_s": {f"{c} {k}": round(v, 1) for (c, k), v in probe.items()},
        "runs": runs,
    }
