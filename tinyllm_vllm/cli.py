"""``tinyllm-vllm``: prepare | demo-model | generate | serve | chat | doctor | bench."""

from __future__ import annotations

import argparse
import sys
import time

from .settings import Settings


def _model(arg: str | None, settings: Settings):
    from .checkpoint import ensure_model

    path, note = ensure_model(arg or settings.model, settings.home)
    print(f"model: {note}", file=sys.stderr)
    return path


def cmd_prepare(a, s):
    from .checkpoint import prepare_checkpoint

    print(prepare_checkpoint(a.src, a.out, revision=a.revision))


def cmd_demo_model(a, s):
    from .checkpoint import demo_model

    print(demo_model(a.out, seed=a.seed))


def cmd_generate(a, s):
    from . import offline

    llm = offline.load_llm(_model(a.model, s), s)
    params = offline.sampling(a.max_tokens or s.max_tokens, a.temperature, a.top_p, a.seed)
    rows = offline.complete(llm, a.prompt, params) if a.raw else offline.chat(llm, a.prompt, params)
    for r in rows:
        print(f"--- {r.prompt}\n{r.text}\n[{r.output_tokens} tokens, finish: {r.finish_reason}]")


def _server(a, s, model):
    from .server import VLLMServer

    return VLLMServer(model, host=a.host, port=a.port, api_key=a.api_key, settings=s,
                      tensor_parallel_size=a.tensor_parallel_size, data_parallel_size=a.data_parallel_size,
                      extra_args=a.vllm_args)


def cmd_serve(a, s):
    server = _server(a, s, _model(a.model, s))
    print("$", " ".join(server.command()), file=sys.stderr)
    server.start()
    print(f"serving {server.served_model_name} at {server.base_url} (log: {server.log_file}); Ctrl-C stops it")
    try:
        while server.running:
            time.sleep(1)
        print(server.log_tail(), file=sys.stderr)
        sys.exit(f"server exited with code {server.proc.returncode}")
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def cmd_chat(a, s):
    from .client import openai_client

    server = None
    if a.url:
        client, name = openai_client(a.url, a.api_key), None
    else:
        server = _server(a, s, _model(a.model, s)).start()
        client, name = server.openai_client(), server.served_model_name
    try:
        name = name or client.models.list().data[0].id
        history: list[dict] = []
        print(f"chatting with {name} (empty line or Ctrl-D to quit)")
        while True:
            try:
                q = input("you> ").strip()
            except EOFError:
                break
            if not q:
                break
            history.append({"role": "user", "content": q})
            print("tinyllm> ", end="", flush=True)
            answer = ""
            stream = client.chat.completions.create(model=name, messages=history, stream=True,
                                                    max_tokens=a.max_tokens or s.max_tokens,
                                                    temperature=a.temperature, top_p=a.top_p)
            for chunk in stream:
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    answer += piece
                    print(piece, end="", flush=True)
            print()
            history.append({"role": "assistant", "content": answer})
    finally:
        if server:
            server.stop()


def cmd_doctor(a, s):
    from .doctor import checks

    results = checks(a.model_dir)
    for c in results:
        print(c)
    sys.exit(0 if all(c.ok for c in results) else 1)


def cmd_bench(a, s):
    from . import bench

    bench.main(a, s)


def main(argv: list[str] | None = None) -> None:
    s = Settings.from_env()
    ap = argparse.ArgumentParser(prog="tinyllm-vllm", description="TinyLLM on vLLM")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare", help="turn a TinyLLM checkpoint into one vLLM/transformers load faithfully")
    p.add_argument("src", help="local dir, hub id (wdndev/tiny_llm_sft_92m) or modelscope:ID")
    p.add_argument("out")
    p.add_argument("--revision")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("demo-model", help="build the small random-weight TinyLLM (published layout)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_demo_model)

    def model_arg(p):
        p.add_argument("--model", help="prepared dir, hub id, modelscope:ID, demo or auto (default: $TINYLLM_MODEL)")

    def sampling_args(p):
        p.add_argument("--max-tokens", type=int)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--top-p", type=float, default=1.0)

    p = sub.add_parser("generate", help="offline generation with vllm.LLM")
    p.add_argument("prompt", nargs="+")
    p.add_argument("--raw", action="store_true", help="plain completion instead of the chat format")
    p.add_argument("--seed", type=int)
    model_arg(p)
    sampling_args(p)
    p.set_defaults(fn=cmd_generate)

    def server_args(p):
        model_arg(p)
        p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes the server to your network")
        p.add_argument("--port", type=int)
        p.add_argument("--api-key")
        p.add_argument("--tensor-parallel-size", type=int, default=1)
        p.add_argument("--data-parallel-size", type=int, default=1)
        p.add_argument("--vllm-args", nargs=argparse.REMAINDER, default=[], help="passed to vLLM as is")

    p = sub.add_parser("serve", help="vLLM's OpenAI-compatible server on TinyLLM")
    server_args(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("chat", help="interactive streaming chat against --url or a server it starts")
    p.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000/v1")
    server_args(p)
    sampling_args(p)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("doctor", help="versions, device, vLLM build, plugin, prepared model: OK/FAIL")
    p.add_argument("model_dir", nargs="?")
    p.set_defaults(fn=cmd_doctor)

    p = sub.add_parser("bench", help="offline throughput (plugin vs vLLM Qwen2 vs transformers) and serving")
    model_arg(p)
    from .bench import add_args

    add_args(p)
    p.set_defaults(fn=cmd_bench)

    a = ap.parse_args(argv)
    try:
        a.fn(a, s)
    except Exception as e:  # our own errors are messages for the user, not tracebacks
        from .checkpoint import CheckpointError
        from .config import TinyllmConfigError
        from .server import ServerError

        if isinstance(e, CheckpointError | TinyllmConfigError | ServerError):
            sys.exit(f"error: {e}")
        raise


if __name__ == "__main__":
    main()
