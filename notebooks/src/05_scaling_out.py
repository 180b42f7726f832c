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
# # 05 · Scaling out: replicas behind vLLM's router
#
# **Goal:** serve more than one engine can through a single OpenAI endpoint.
# **Runtime:** about a minute on 2 CPU cores.
#
# One vLLM engine is bound by its own host work: profiled on an H100, the engine core's one Python thread
# is busy 84% of the time scheduling and bookkeeping, and one server's single API server process is a
# second limit. So run N servers side by side on the one GPU, each with 1/N of its memory, and put
# `vllm-router` (vLLM's Rust load balancer) in front: one endpoint, health checks, retries. On an H100,
# 4 replicas served 3.8x one server. On several GPUs, vLLM's own `--data-parallel-size` and
# `--tensor-parallel-size` pass through unchanged (`tinyllm-vllm serve --data-parallel-size 2`).

# %% tags=["parameters"]
import os

from tinyllm_vllm.settings import Settings

settings = Settings.from_env()
# "auto" fills the GPU (what `tinyllm-vllm serve` does there); the CPU walkthrough shows 2
REPLICAS = os.environ.get("TINYLLM_REPLICAS", "auto" if settings.device == "cuda" else "2")
# 1: each replica starts light (one API server, the model in the engine's process); 0: as `tinyllm-vllm serve`
LIGHT = os.environ.get("TINYLLM_LIGHT_START", "1") == "1"

# %%
from tinyllm_vllm.model.sources import ensure_model

model_dir, note = ensure_model(settings.model, settings.home, verbose=settings.verbose)
print("model:", note)

# %% [markdown]
# ## 1. Start the replicas and the router
# The servers start at the same time, each with a fixed share of the memory (so vLLM's memory
# profiling in one does not see the others' allocations). The router starts as soon as the first replica
# is ready, so the endpoint answers from then on; each other replica joins the router the moment it is
# ready. `wait_all()` waits for the last one (full capacity). `auto` picks the number
# from the CPU cores, the GPU memory and what was measured to fill a GPU, and says why in one line.
# `tinyllm-vllm serve --replicas N` does the same, with more processes per replica: on a GPU it gives each
# replica several API server processes and runs the model in a worker process of its own, which serves
# more under full load. Here each replica starts light (vLLM's own layout for one engine): 2 processes
# each instead of 5, so the replicas are ready sooner. On the CPU both are the same.

# %%
from tinyllm_vllm.runtime.deploy import Replicas

fleet = Replicas(model_dir, REPLICAS, settings=settings, light=LIGHT).start()
print(f"first answer after {fleet.first_answer_s:.0f} s")
fleet.wait_all()
print(f"all {len(fleet.joined)} replicas answering after {fleet.all_ready_s:.0f} s")

# %% [markdown]
# ## 2. One endpoint
# Clients talk to the router exactly as to one server. Each replica's `/metrics` shows it took a share.

# %%
from tinyllm_vllm.client import metric

client = fleet.openai_client()
for q in ["介绍一下中国。", "世界上最大的动物是什么？", "请介绍一下北京", "你好"] * len(fleet.servers):
    reply = client.chat.completions.create(
        model=fleet.served_model_name,
        messages=[{"role": "user", "content": q}],
        max_tokens=settings.max_tokens,
        temperature=0,
    )
served = [metric(s, "vllm:request_success_total") for s in fleet.servers]
print("requests served per replica:", served)
assert all(n > 0 for n in served)

# %% [markdown]
# ## 3. A replica dies
# Kill one replica's whole process group: the router notices within seconds and the endpoint keeps
# answering from the others.

# %%
import signal

from tinyllm_vllm.runtime.procs import wait_group_gone

os.killpg(fleet.servers[-1].proc.pid, signal.SIGKILL)
assert wait_group_gone(fleet.servers[-1].proc.pid)
answers = [
    client.chat.completions.create(
        model=fleet.served_model_name, max_tokens=16, temperature=0, messages=[{"role": "user", "content": "你好"}]
    )
    .choices[0]
    .message.content
    for _ in range(6)
]
print(f"{len(answers)} answers after the kill:", answers[0])

# %% [markdown]
# ## 4. Stop everything
# The router and every replica, each with its whole process group.

# %%
from tinyllm_vllm.runtime.procs import group_members

fleet.stop()
groups = [fleet.router.proc.pid] + [s.proc.pid for s in fleet.servers]
assert not any(group_members(g) for g in groups)
print("stopped: router and", len(fleet.servers), "replicas")

# %% [markdown]
# What this buys on a GPU, measured with vLLM's own `vllm bench serve`, is in `results/gpu/` and the README.
