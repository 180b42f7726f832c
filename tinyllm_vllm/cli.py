"""``tinyllm-vllm``: prepare | demo-model | generate | serve | chat | doctor | bench.

Results go to stdout; the kit's own progress lines and vLLM's warnings go to stderr. Flags that
``serve`` and ``chat`` do not know pass through to ``vllm serve`` as they are
(``tinyllm-vllm serve --tensor-parallel-size 2 --max-num-seqs 64``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import TinyllmError
from .settings import Settings


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _model(arg: str | None, settings: Settings) -> Path:
    from .sources import ensure_model

    path, note = ensure_model(arg or settings.model, settings.home)
    say(f"model: {note}")
    return path


def cmd_prepare(a: argparse.Namespace, s: Settings) -> None:
    from .sources import prepare

    print(prepare(a.src, a.out, revision=a.revision))


def cmd_demo_model(a: argparse.Namespace, s: Settings) -> None:
    from .demo import demo_model

    print(demo_model(a.out))


def cmd_generate(a: argparse.Namespace, s: Settings) -> None:
    from . import offline

    llm = offline.load_llm(_model(a.model, s), s, echo=say)
    try:
        params = offline.sampling(a.max_tokens or s.max_tokens, a.temperature, a.top_p, a.seed)
        rows = offline.complete(llm, a.prompt, params) if a.raw else offline.chat(llm, a.prompt, params)
        for r in rows:
            print(f"--- {r.prompt}\n{r.text}\n[{r.output_tokens} tokens, finish: {r.finish_reason}]", flush=True)
    finally:
        offline.close(llm, echo=say)


def _deployment(a: argparse.Namespace, s: Settings, model: Path) -> Any:  # VLLMServer or Replicas
    from .deploy import Replicas
    from .server import VLLMServer

    if a.replicas > 1:
        return Replicas(
            model, a.replicas, a.vllm_args, settings=s, host=a.host, port=a.port, api_key=a.api_key, echo=say
        )
    return VLLMServer(model, a.vllm_args, settings=s, host=a.host, port=a.port, api_key=a.api_key, echo=say)


def cmd_serve(a: argparse.Namespace, s: Settings) -> None:
    server = _deployment(a, s, _model(a.model, s))
    with _stopped_on_exit(server):
        server.start()
        print(f"serving {server.served_model_name} at {server.base_url}; Ctrl-C stops it", flush=True)
        while server.running:
            time.sleep(0.5)
        say(server.log_tail())
        raise TinyllmError(f"the server exited (log: {server.log_file})")


def cmd_chat(a: argparse.Namespace, s: Settings) -> None:
    from .client import openai_client, stream_chat

    server = None if a.url else _deployment(a, s, _model(a.model, s))
    with _stopped_on_exit(server):
        if server:
            server.start()
        client = server.openai_client() if server else openai_client(a.url, a.api_key)
        name = server.served_model_name if server else client.models.list().data[0].id
        if a.web:
            from .chat_ui import launch

            launch(client, name, share=a.share, block=True)
            return
        history: list[dict] = []
        print(f"chatting with {name} (empty line or Ctrl-D to quit)", flush=True)
        while True:
            try:
                question = input("you> ").strip()
            except EOFError:
                break
            if not question:
                break
            history.append({"role": "user", "content": question})
            print("tinyllm> ", end="", flush=True)
            answer = ""
            for piece in stream_chat(
                client, name, history, max_tokens=a.max_tokens or s.max_tokens, temperature=a.temperature, top_p=a.top_p
            ):
                answer += piece
                print(piece, end="", flush=True)
            print()
            history.append({"role": "assistant", "content": answer})


class _stopped_on_exit:
    """Stop a server (or replicas) however the command ends; on Ctrl-C within about two seconds, and say so."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        if self.server is None:
            return False
        interrupted = kind is KeyboardInterrupt
        self.server.stop(grace=2 if interrupted else 20)
        if interrupted:
            say(
                f"interrupted: stopped {self.server.kind} {self.server.url} and all its processes "
                f"(log: {self.server.log_file})"
            )
            raise SystemExit(130)
        return False


def cmd_doctor(a: argparse.Namespace, s: Settings) -> None:
    from .doctor import checks

    results = checks(a.model_dir)
    for c in results:
        print(c)
    sys.exit(0 if all(c.ok for c in results) else 1)


def cmd_bench(a: argparse.Namespace, s: Settings) -> None:
    from .bench.cli import run

    run(a, s)


def parser() -> tuple[argparse.ArgumentParser, set[str]]:
    ap = argparse.ArgumentParser(prog="tinyllm-vllm", description="TinyLLM on vLLM")
    sub = ap.add_subparsers(dest="cmd", required=True)
    passthrough: set[str] = set()

    p = sub.add_parser("prepare", help="turn a TinyLLM checkpoint into one vLLM/transformers load faithfully")
    p.add_argument("src", help="local dir, hub id (wdndev/tiny_llm_sft_92m) or modelscope:ID")
    p.add_argument("out")
    p.add_argument("--revision")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("demo-model", help="write the embedded demo model (published layout)")
    p.add_argument("out")
    p.set_defaults(fn=cmd_demo_model)

    def model_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="prepared dir, hub id, modelscope:ID, demo or auto (default: $TINYLLM_MODEL)")

    def sampling_args(p: argparse.ArgumentParser) -> None:
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

    def server_args(p: argparse.ArgumentParser) -> None:
        model_arg(p)
        p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes the server to your network")
        p.add_argument("--port", type=int)
        p.add_argument("--api-key")
        p.add_argument(
            "--replicas",
            type=int,
            default=1,
            help="N servers sharing the GPU behind vllm-router (each gets 1/N of the memory)",
        )

    p = sub.add_parser("serve", help="vLLM's OpenAI-compatible server on TinyLLM (other flags go to vllm serve)")
    server_args(p)
    p.set_defaults(fn=cmd_serve)
    passthrough.add("serve")

    p = sub.add_parser(
        "chat", help="streaming chat in the terminal or the browser, against --url or a server it starts"
    )
    p.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--web", action="store_true", help="a Gradio chat page instead of the terminal")
    p.add_argument("--share", action="store_true", help="with --web: also a public gradio.live link")
    server_args(p)
    sampling_args(p)
    p.set_defaults(fn=cmd_chat)
    passthrough.add("chat")

    p = sub.add_parser("doctor", help="versions, device, vLLM build, plugin, prepared model: OK/FAIL")
    p.add_argument("model_dir", nargs="?")
    p.set_defaults(fn=cmd_doctor)

    p = sub.add_parser("bench", help="benchmarks: offline engines, vLLM's own tools, serving, plots")
    from .bench.cli import add_args

    add_args(p)
    p.set_defaults(fn=cmd_bench)
    return ap, passthrough


def main(argv: list[str] | None = None) -> None:
    ap, passthrough = parser()
    a, rest = ap.parse_known_args(argv)
    if rest and a.cmd not in passthrough:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    a.vllm_args = rest
    fn: Callable[[argparse.Namespace, Settings], None] = a.fn
    try:
        fn(a, Settings.from_env())
    except TinyllmError as e:  # the kit's own errors are messages for the user, not tracebacks
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        say("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
