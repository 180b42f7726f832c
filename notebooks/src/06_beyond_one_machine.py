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
# # 06 · Beyond one machine: Ray Serve LLM, a router over hosts, Kubernetes
#
# **Goal:** serve TinyLLM from a Ray cluster through Ray Serve LLM, and see the two other ways out of one
# machine: `vllm-router` over servers on several hosts, and Kubernetes.
# **Runtime:** seconds on a CPU; about four minutes on a GPU.
#
# **On a CPU this notebook is a dry run of the configuration only.** Ray Serve LLM 2.58 runs with the CUDA
# build of vLLM 0.26 (`pip install 'tinyllm-vllm[cuda,ray]'`); next to the CPU build it does not import.
# There the notebook builds and checks the app's config and skips the steps that start Ray.
#
# The step that trips most custom models on Ray: a model registered in the driver only is "not found"
# in Ray's workers. The kit registers TinyLLM through vLLM's plugin entry point, which vLLM loads in
# every process it starts, Ray's workers included, on every node where the package is installed.

# %% tags=["parameters"]
import importlib.util
import os

from tinyllm_vllm.settings import Settings

settings = Settings.from_env()
REPLICAS = os.environ.get("TINYLLM_REPLICAS", "auto" if settings.device == "cuda" else "2")
RAY = settings.device == "cuda" and importlib.util.find_spec("ray") is not None
THROUGHPUT = os.environ.get("TINYLLM_RAY_THROUGHPUT", "0") == "1"  # Ray's high-throughput mode (step 1)
print("Ray Serve LLM:", "runs here" if RAY else "config only here (needs the CUDA build of vLLM 0.26 and ray)")

# %%
from tinyllm_vllm.model.sources import ensure_model

model_dir, note = ensure_model(settings.model, settings.home, verbose=settings.verbose)
print("model:", note)

# %% [markdown]
# ## 1. The app as a Ray Serve config
# One `LLMConfig` made from the kit's settings: the prepared model, the same engine arguments as every
# other engine the kit starts (each replica with 1/N of the memory), N replicas each on a fraction of
# one GPU. Saved as a file, it is what `serve run` deploys on any Ray cluster, with no Python of yours.

# %%
import json

from tinyllm_vllm.runtime.cluster import serve_config

config = serve_config(model_dir, settings, REPLICAS)
llm = config["applications"][0]["args"]["llm_configs"][0]
config_file = settings.home / "tinyllm-serve.json"
config_file.write_text(json.dumps(config, indent=2))
print("replicas:", llm["deployment_config"], "| each on:", llm["placement_group_config"]["bundles"][0])
print("engine:", {k: llm["engine_kwargs"][k] for k in ("dtype", "max_model_len", "model_impl")})
print(f"saved: {config_file}  ->  serve run {config_file.name}")

# %% [markdown]
# Ray's **high-throughput mode** (Ray 2.56 and later; `serve --ray --ray-throughput`) changes how requests
# reach the replicas, not the replicas: gRPC between Serve's replicas, more HTTP ingress replicas, and
# where the `haproxy` binary is installed, HAProxy in front with direct streaming (each LLM replica answers
# HTTP itself, so there is no ingress deployment). Its settings are environment variables read where Ray
# and Serve start (`ray start` on every node of a cluster).

# %%
from tinyllm_vllm.runtime.cluster import throughput_env

tuned = serve_config(model_dir, settings, REPLICAS, throughput=True)["applications"][0]["args"]
print(
    "ingress replicas:",
    config["applications"][0]["args"]["ingress_deployment_config"]["num_replicas"],
    "->",
    tuned.get("ingress_deployment_config", {"num_replicas": "none (direct streaming)"})["num_replicas"],
)
print("environment where Serve starts:", throughput_env())

# %% [markdown]
# ## 2. Serve it through Ray Serve LLM
# `RayServe` starts a Ray on this machine (or joins one: `address="auto"`), deploys the app and waits
# until every replica's engine is up. The endpoint speaks the same OpenAI API as `vllm serve`.
# `tinyllm-vllm serve --ray` does the same from a shell.

# %%
from tinyllm_vllm.runtime.cluster import RayServe

app = RayServe(model_dir, REPLICAS, settings=settings, throughput=THROUGHPUT).start() if RAY else None
print(app.base_url if app else "skipped: no Ray Serve LLM on this machine")

# %% [markdown]
# ## 3. The four calls every client makes
# The model list, a completion, a chat reply and a streamed chat reply, with the `openai` client.

# %%
if app:
    client = app.openai_client()
    print("models:", [m.id for m in client.models.list().data])
    done = client.completions.create(model=app.served_model_name, prompt="你好", max_tokens=16, temperature=0)
    print("completion:", done.choices[0].text)
    ask = [{"role": "user", "content": "介绍一下中国。"}]
    chat = client.chat.completions.create(model=app.served_model_name, messages=ask, max_tokens=32, temperature=0)
    print("chat:", chat.choices[0].message.content)
    stream = client.chat.completions.create(
        model=app.served_model_name, messages=ask, max_tokens=32, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == chat.choices[0].message.content
    print("streamed: the same reply, in", len(streamed), "characters")

# %% [markdown]
# ## 4. A batch on Ray Data LLM
# For batch work beyond one GPU, Ray Data LLM runs vLLM engines as a Ray Data stage. The kit gives it the
# same rows as the local `generate --input` (JSONL of prompts or chats, each row's own sampling fields)
# and writes the same output, in input order. Ray's engine stage sends text to vLLM, and vLLM adds the
# tokenizer's `[gMASK]sop` prefix itself: a chat goes as the chat template's text without that prefix, so
# the engine sees the very tokens the local batch gives its engines. The check below proves it on the
# tokenizer; the processor's config is built here on any machine, and the batch runs where Ray does.
# From a shell: `tinyllm-vllm generate --input rows.jsonl --output out.jsonl --ray`.

# %%
from transformers import AutoTokenizer

from tinyllm_vllm.batch import BatchJob, prompt_ids, read_rows
from tinyllm_vllm.ray_batch import processor_config, prompt_texts, run_ray_batch

questions = ["中国的首都是哪里？", "介绍一下中国。", "你好", "请介绍一下你自己。"]
rows_file = settings.home / "ray-batch-rows.jsonl"
rows_file.write_text(
    "".join(json.dumps({"id": i, "prompt": q}, ensure_ascii=False) + "\n" for i, q in enumerate(questions))
)
processor = processor_config(model_dir, settings)
print("engines:", processor["concurrency"], "| each on:", processor["placement_group_config"]["bundles"][0])
tok = AutoTokenizer.from_pretrained(str(model_dir))
rows = read_rows(rows_file)
assert tok(prompt_texts(tok, rows, raw=False))["input_ids"] == prompt_ids(tok, rows, raw=False)
print("Ray's prompts become the local batch's tokens:", len(rows), "rows")

# %%
out_file = settings.home / "ray-batch-out.jsonl"
out_file.unlink(missing_ok=True)
if RAY:
    if app:
        app.stop()  # the batch's engines need the GPU share the app's replicas hold
    run_ray_batch(model_dir, BatchJob(rows_file, out_file, max_tokens=32), settings)
    results = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["id"] for r in results] == list(range(len(questions)))
    for r in results:
        print(questions[r["id"]], "->", r["text"][:40], f"({r['output_tokens']} tokens, {r['finish_reason']})")
else:
    print("skipped: no Ray Data LLM on this machine")

# %% [markdown]
# ## 5. Many machines
# **Ray:** start Ray on each machine, then deploy the same app to the cluster. Install the package (with
# the `cuda,ray` extras) on every node, and give every node the prepared model at the same path (or a
# shared filesystem):
#
#     ray start --head                          # on the first machine
#     ray start --address HEAD_IP:6379          # on each other machine
#     tinyllm-vllm serve --ray --ray-address auto --replicas 8 --host 0.0.0.0
#
# `LocalCluster(home, nodes=2)` makes the same two commands on one machine, each node with its own share of
# the CPUs: how a cluster looks to Ray (the replicas spread over nodes, a node lost and the app served from
# the other), without the network between real hosts. `tinyllm-vllm bench ray` runs the app on it.
#
# **vllm-router over hosts:** run `tinyllm-vllm serve` on each machine, then one router in front:
# `tinyllm-vllm route --workers http://host1:8000 http://host2:8000`. Its failure policy:

# %%
from tinyllm_vllm.runtime.deploy import REMOTE_POLICY_TEXT

print(REMOTE_POLICY_TEXT)

# %% [markdown]
# **Kubernetes:** the repository's `deploy/` folder holds an image (vLLM's own plus this package) and a
# Deployment with readiness on `/health`, a Service and a HorizontalPodAutoscaler; `make test` checks the
# manifests with `kubernetes-validate`.
#
# ## 6. Stop everything
# Ray Serve shuts the app down, the Ray this notebook started stops, and any Ray process left of it is
# stopped too (all of them carry one environment mark).

# %%
from tinyllm_vllm.runtime.cluster import MARK
from tinyllm_vllm.runtime.procs import marked

if app:
    app.stop()
    assert not marked(MARK, app.token), "Ray processes left"
print("stopped" if app else "nothing was started")
