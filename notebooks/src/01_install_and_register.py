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
# # 01 · Install and register TinyLLM in vLLM
#
# **Goal:** see how vLLM finds a model it does not ship (a *plugin*, not a file copied into
# site-packages) and prepare a checkpoint vLLM can load.
# **Runtime:** under a minute (the first time with the real model, a 184 MB download).
#
# The original project (for vLLM 0.4.0) told you to copy `tinyllm.py` into vLLM's installation and
# edit its model table. Modern vLLM has a documented plugin system instead.

# %% tags=["parameters"]
from tinyllm_vllm.settings import Settings

settings = Settings.from_env()

# %% [markdown]
# ## 1. The entry point
# Installing the package registered this in its metadata (see `pyproject.toml`):
#
# ```toml
# [project.entry-points."vllm.general_plugins"]
# tinyllm = "tinyllm_vllm.model.plugin:register"
# ```
# vLLM calls every function of the group `vllm.general_plugins` in **every process it creates** (the
# front end, the engine core, each worker). That is why the model cannot live in a notebook cell: the
# worker processes would never see it.

# %%
from importlib.metadata import entry_points

plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
plugins

# %%
assert plugins.get("tinyllm") == "tinyllm_vllm.model.plugin:register"

# %% [markdown]
# ## 2. What `register()` does
# It is small on purpose: vLLM calls it several times per engine, so it must be idempotent and cheap.
# The model class is registered by **import path**, so vLLM imports it only where the model is built.

# %%
import inspect

import tinyllm_vllm.model.plugin as plugin

print(inspect.getsource(plugin.register))

# %% [markdown]
# ## 3. A tour of the vLLM model file
# `tinyllm_vllm/model/vllm_model.py` builds TinyLLM from vLLM's public layers. TinyLLM is layer for layer Qwen2:
# q/k/v projections with bias (fused into one `QKVParallelLinear`), rotate-half RoPE
# (`is_neox_style=True`), RMSNorm with the residual add fused in, and a SwiGLU MLP
# (`MergedColumnParallelLinear` + `SiluAndMul`). The parallel linears make it tensor-parallel ready.
# Here is the attention block:

# %%
from tinyllm_vllm.model import vllm_model as tinyllm_model

print(inspect.getsource(tinyllm_model.TinyllmAttention))

# %% [markdown]
# `load_weights` maps the published names onto the fused parameters:
# `q_proj/k_proj/v_proj → qkv_proj`, `gate_proj/up_proj → gate_up_proj`.

# %%
tinyllm_model.STACKED

# %% [markdown]
# ## 4. vLLM's registry
# Loading vLLM's plugins in this kernel runs `register()`; afterwards vLLM's model registry lists
# `TinyllmForCausalLM` next to the architectures vLLM ships.

# %%
archs = plugin.supported_architectures()
print(len(archs), "architectures; ours:", [a for a in archs if a.startswith("Tinyllm")])
assert "TinyllmForCausalLM" in archs

# %% [markdown]
# ## 5. Prepare the checkpoint
# The published checkpoint ships a *remote-code* tokenizer that silently corrupts itself on
# transformers ≥ 4.47 (`<|assistant|>` stops being one token) and a chat template that does not
# match the training format. `ensure_model` downloads it (the Hugging Face hub first, then ModelScope;
# `VLLM_USE_MODELSCOPE=True` reverses that) and prepares a directory vLLM and transformers load with
# **no remote code**: a fast tokenizer with identical ids, the training-format chat template, the real
# stop ids, and the weights linked, never rewritten. Where neither hub can be reached, the kit uses
# its **demo model**: a small TinyLLM trained on the questions these notebooks ask, prepared through the
# very same path. The note says which one you got, and why.

# %%
from tinyllm_vllm.model.sources import ensure_model

model_dir, note = ensure_model(settings.model, settings.home, verbose=settings.verbose)
print("model:", note)
sorted(p.name for p in model_dir.iterdir())

# %% [markdown]
# The chat template renders exactly the format TinyLLM was fine-tuned on:

# %%
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(model_dir)
messages = [{"role": "user", "content": "介绍一下中国。"}]
prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
print(prompt)
assert prompt == "[gMASK]sop<|system|>\n你是由wdndev开发的个人助手。\n<|user|>\n介绍一下中国。\n<|assistant|>\n"

# %% [markdown]
# Next: **02_offline_generation**.
