# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     notebook_metadata_filter: kernelspec,-jupytext.text_representation
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Benchmarks
#
# **Goal:** measure what vLLM buys for TinyLLM on traffic like a chat service's, and check that the
# plugin's model class costs nothing against vLLM's own Qwen2 class on the same weights.
# **Runtime:** about 2 minutes on 2 CPU cores (CI size); on a GPU (GPU size) each engine also starts once.
#
# The engines, each in its own process, on one checkpoint:
# the TinyLLM **plugin**; vLLM's built-in **Qwen2** class (`hf_overrides`); transformers `generate`
# in **static** left-padded batches at its best batch size; transformers' own **continuous batching**.
# Speed counts *useful* output tokens: the tokens the requests asked for. A static batch runs until
# its longest request, so padding and tokens past a request's end are cost, not output.

# %% tags=["parameters"]
import os

from tinyllm_vllm.settings import Settings

settings = Settings.from_env()
# ci: small enough for 2 CPU cores; gpu: big enough to show a GPU's story; auto picks by device
SIZE = os.environ.get("TINYLLM_BENCH_SIZE", "auto")
SIZE = ("gpu" if settings.device == "cuda" else "ci") if SIZE == "auto" else SIZE
RESULTS = os.environ.get("TINYLLM_RESULTS")  # a folder to keep the result files in (default: temporary)
SIZE

# %%
import tempfile
from pathlib import Path

from tinyllm_vllm.bench.workload import ChatLike, Fixed
from tinyllm_vllm.model.sources import ensure_model

model_dir, note = ensure_model(settings.model, settings.home, verbose=settings.verbose)
print("model:", note)
out_dir = Path(RESULTS or tempfile.mkdtemp(prefix="tinyllm-bench-"))
out_dir.mkdir(parents=True, exist_ok=True)
if SIZE == "gpu":
    chat_like = ChatLike(requests=1024, prompt_range=(16, 384), reply_median=100, reply_max=512)
    fixed = Fixed(requests=1024, input_len=128, output_len=128)
    batch_sizes = (64, 256, 1024)
else:
    chat_like = ChatLike(requests=32, prompt_range=(16, 96), reply_median=24, reply_max=64)
    fixed = Fixed(requests=32, input_len=32, output_len=32)
    batch_sizes = (8, 32)
print(chat_like.describe())

# %% [markdown]
# ## 1. Two workloads, one start per engine
# **Chat-like traffic**: prompts of different lengths, replies of different lengths; each request asks for
# exactly its reply length (`max_tokens`, with `ignore_eos`), standing in for where an answer would end.
# **Fixed lengths**: every prompt and every reply the same length, so nobody in a static batch waits for
# a longer request: the best case for transformers' `generate`.
#
# Each engine starts once, in its own process, and times both workloads in turn: a start costs far more
# than these runs, so one start per engine class keeps the notebook short.

# %%
from tinyllm_vllm.bench import report
from tinyllm_vllm.bench.compare import offline

engines = ["plugin", "qwen2", "transformers_static", "transformers_cb"]
# as_vllm_bench: the plugin's engine also times the calls `vllm bench throughput` makes, for a cross-check
chat_result, fixed_result = offline(
    model_dir,
    [chat_like, fixed],
    engines,
    settings.engine_options(),
    out_dir,
    hf_batch_sizes=batch_sizes,
    as_vllm_bench=True,
    timeout=300,
)

# %% [markdown]
# The chat-like traffic:

# %%
print(report.offline_table(chat_result))
assert {"plugin", "qwen2"} <= set(chat_result["useful_tok_s"]), "vLLM's engines must run"
assert all(v > 0 for v in chat_result["useful_tok_s"].values())
print(f"\nplugin / vLLM Qwen2 = {chat_result['ratios']['plugin_vs_qwen2']:.2f}x")

# %% [markdown]
# The fixed lengths, on the same engines:

# %%
print(report.offline_table(fixed_result))
assert {"plugin", "transformers_static"} <= set(fixed_result["useful_tok_s"])

# %% [markdown]
# Each vLLM engine's start went into the kit's log of starts (`logs/starts.jsonl` in its home), beside
# the engines, servers and replicas of the other notebooks: how long each waited before it could
# generate, and where that time went (`tinyllm-vllm bench walkthrough` collects them).

# %%
from tinyllm_vllm.runtime.startup import read_starts

engine_starts = {s["what"]: s["seconds"] for s in read_starts(settings.home)}  # the latest of each
print(", ".join(f"{what}: {seconds:.0f} s" for what, seconds in engine_starts.items() if what.startswith("bench")))
assert {"benchmark engine (plugin)", "benchmark engine (qwen2)"} <= set(engine_starts)

# %%
import json

from IPython.display import Image, display

for name, result in (("bench_chat.json", chat_result), ("bench_fixed.json", fixed_result)):
    (out_dir / name).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
display(Image(str(report.plot_offline([chat_result, fixed_result], out_dir / "bench.png"))))

# %% [markdown]
# **What 2 CPU cores can and cannot show.** On the CPU, with the tiny demo model, every engine is
# bound by per-step work in Python, not by arithmetic, and the numbers move by tens of percent from
# run to run. They show that every engine runs and that the harness counts useful tokens; they cannot
# rank vLLM against transformers. On a GPU with the 92M model the chat-like traffic is where vLLM's
# continuous batching pays: static batches wait for their longest reply (the committed GPU figures are
# at the end of this notebook).

# %% [markdown]
# ## 2. The whole GPU
# One engine of a 92M model is paced by its own CPU threads (scheduling, output processing), not by
# the GPU: on an H200 it kept the card busy 15% of the time. The kit's one-GPU plan (`plan.plan`)
# runs several engines side by side, each on a share of the requests and of the memory, as many as
# the CPU cores, the GPU memory and the measured useful count allow; `tinyllm-vllm serve` and
# `tinyllm-vllm generate --input` use the same plan. Here it runs beside the single engine of step 1
# (on a CPU the plan is one engine: the cores are the limit already).

# %%
from tinyllm_vllm.runtime.plan import plan

gpu_plan = plan(settings, offline=True)
print(gpu_plan.why)
if gpu_plan.engines > 1:
    options = settings.engine_options() | gpu_plan.engine_options
    shared = offline(
        model_dir, chat_like, ["plugin"], options, out_dir, engines_per_gpu=gpu_plan.engines, settings=settings
    )
    single = chat_result["useful_tok_s"]["plugin"]
    print(f"one engine {single:,.0f}, {gpu_plan.engines} engines {shared['useful_tok_s']['plugin']:,.0f} useful tok/s")

# %% [markdown]
# The committed measurement of the whole card (`tinyllm-vllm bench one-gpu`), the README's headline: every
# run at least 20 s and 8x the requests in flight, the rate while the engines were full, median of 3.

# %%
one_gpu = json.loads((Path("..") / "results" / "gpu" / "one_gpu.json").read_text())
print(f"{one_gpu['machine']['gpu']}, {one_gpu['machine']['cpu_count']} cores: {one_gpu['plan']}\n")
print(report.one_gpu_table(one_gpu))

# %% [markdown]
# Next: **05_scaling_out**, several servers behind one endpoint.
