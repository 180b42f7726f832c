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
# # 02 · Offline generation with `vllm.LLM`
#
# **Goal:** generate with TinyLLM inside this kernel: batched chat prompts, greedy and sampled.
# **Runtime:** under a minute on 2 CPU cores (starting the engine dominates), seconds on a GPU.

# %% tags=["parameters"]
from tinyllm_vllm.settings import Settings

settings = Settings.from_env()
settings

# %%
from tinyllm_vllm.model.sources import ensure_model

model_dir, note = ensure_model(settings.model, settings.home, verbose=settings.verbose)
print("model:", note)

# %% [markdown]
# ## 1. Start the engine
# `load_llm` passes the settings to `vllm.LLM` (the one table of engine options the server gets too):
# the dtype, the context length, the memory vLLM may take (on CPU an explicit KV-cache size, on GPU a
# share of its memory) and `model_impl="vllm"`, so a missing plugin is an error rather than a silent
# fallback. The engine's own log goes to a file; the cell shows where, and how long the start took.

# %%
from tinyllm_vllm.runtime import offline

print(settings.engine_options())
llm = offline.load_llm(model_dir, settings)

# %% [markdown]
# ## 2. Chat prompts, batched
# `offline.chat` builds each prompt with the prepared training-format template (`LLM.chat`). Stop ids
# (eos and the role tokens) come from the prepared `generation_config.json`, which vLLM applies to
# every request. All questions go to the engine in **one** call: vLLM batches them.

# %%
import pandas as pd

questions = ["介绍一下中国。", "世界上最大的动物是什么？", "请介绍一下北京"]
greedy = offline.chat(llm, questions, offline.sampling(settings.max_tokens))
pd.DataFrame(greedy)

# %% [markdown]
# Every answer is readable text that ended because the model said it was done (`finish_reason` `stop`).
# The demo model was trained on these very questions, so its answers are the ones in its corpus.
# (A random-weight checkpoint, like the 92M-shaped one the GPU benchmarks use, writes noise until
# `max_tokens`: only its length is checked.)

# %%
from tinyllm_vllm.model.checkpoint import manifest
from tinyllm_vllm.model.demo import corpus_answers

kind = manifest(model_dir)
assert all(r.output_tokens > 0 for r in greedy)
if not kind["random_weights"]:
    assert all(r.finish_reason == "stop" and "\ufffd" not in r.text for r in greedy)
if kind["demo"]:
    assert [r.text for r in greedy] == [corpus_answers()[q] for q in questions]

# %% [markdown]
# Greedy decoding is deterministic: the same prompts give the same text again.

# %%
again = offline.chat(llm, questions, offline.sampling(settings.max_tokens))
assert [r.text for r in again] == [r.text for r in greedy]

# %% [markdown]
# ## 3. Sampling
# The author's web demo sampled with `top_p=0.8` at temperature 1. Each request below gets its own
# `seed`, so the three answers are three independent draws; asking again with the same seed gives
# the same draw back. (The demo model is so sure of its few answers that its draws often agree; the
# real model's differ.)

# %%
params = [offline.sampling(settings.max_tokens, temperature=1.0, top_p=0.8, seed=s) for s in (1, 2, 3)]
sampled = offline.chat(llm, questions[:1] * 3, params)
pd.DataFrame(sampled)[["text", "output_tokens", "finish_reason"]].assign(seed=[1, 2, 3])

# %%
same_seed = offline.chat(llm, questions[:1], [params[0]])
assert same_seed[0].text == sampled[0].text

# %% [markdown]
# ## 4. Raw completion
# Without the chat format the model just continues the text (the tokenizer still prepends `[gMASK]sop`).

# %%
pd.DataFrame(offline.complete(llm, ["你好", "Hello, world!"], offline.sampling(32)))

# %% [markdown]
# ## 5. Clean up
# Shut the engine down so its processes and memory go away before the next notebook.

# %%
offline.close(llm)

# %% [markdown]
# Next: **03_openai_api_server**.
