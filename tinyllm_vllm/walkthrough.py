"""``make demo``: the whole walkthrough headless, printing what a learner would want to see.

prepare (the published model when a hub can be reached, else the demo model, said plainly) ->
offline generation with vllm.LLM -> vLLM's OpenAI server as a subprocess -> /v1/models,
/v1/completions, /v1/chat/completions -> stop.
"""

from __future__ import annotations

from tinyllm_vllm.client import http_get, http_post
from tinyllm_vllm.model.sources import ensure_model
from tinyllm_vllm.runtime import offline
from tinyllm_vllm.runtime.server import VLLMServer
from tinyllm_vllm.settings import Settings

QUESTIONS = ["介绍一下中国。", "世界上最大的动物是什么？"]


def rule(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def main() -> None:
    s = Settings.from_env()
    rule("1. prepare the checkpoint")
    model, note = ensure_model(s.model, s.home, verbose=s.verbose)
    print(f"model: {note}\ndirectory: {model}\ndevice: {s.device}, dtype: {s.dtype}")

    rule("2. offline generation (vllm.LLM, the plugin's TinyllmForCausalLM)")
    llm = offline.load_llm(model, s)
    for r in offline.chat(llm, QUESTIONS, offline.sampling(s.max_tokens)):
        print(
            f"Q: {r.prompt}\nA: {r.text}\n   [{r.prompt_tokens} prompt + {r.output_tokens} tokens, {r.finish_reason}]"
        )
    offline.close(llm)  # frees the engine before the server takes the memory

    rule("3. vLLM's OpenAI-compatible server (subprocess)")
    with VLLMServer(model, settings=s) as server:
        rule("GET /v1/models")
        models = http_get(server.base_url, "/models", show=True)
        print(f"-> models: {', '.join(m['id'] for m in models['data'])}")
        rule("POST /v1/completions")
        body = http_post(
            server.base_url,
            "/completions",
            {"model": server.served_model_name, "prompt": "你好", "max_tokens": 32, "temperature": 0},
            show=True,
        )
        print(f"-> {body['choices'][0]['text']} ({body['choices'][0]['finish_reason']})")
        rule("POST /v1/chat/completions")
        body = http_post(
            server.base_url,
            "/chat/completions",
            {
                "model": server.served_model_name,
                "messages": [{"role": "user", "content": QUESTIONS[0]}],
                "max_tokens": s.max_tokens,
                "temperature": 0,
            },
            show=True,
        )
        print(f"-> {body['choices'][0]['message']['content']} ({body['choices'][0]['finish_reason']})")
    rule("done")
    print(f"server stopped (the curl lines above need a running one: tinyllm-vllm serve); log: {server.log_file}")


if __name__ == "__main__":
    main()
