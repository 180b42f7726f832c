"""``tinyllm-vllm``: prepare | demo-model | generate | serve | chat | route | doctor | bench.

Results go to stdout; the kit's own progress lines and vLLM's warnings go to stderr. Flags that
``serve`` and ``chat`` do not know pass through to ``vllm serve`` as they are
(``tinyllm-vllm serve --tensor-parallel-size 2 --max-num-seqs 64``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinyllm_vllm.errors import TinyllmError
from tinyllm_vllm.settings import Settings


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _model(arg: str | None, settings: Settings) -> Path:
    from tinyllm_vllm.model.sources import ensure_model

    path, note = ensure_model(arg or settings.model, settings.home, verbose=settings.verbose)
    say(f"model: {note}")
    return path


def cmd_prepare(a: argparse.Namespace, s: Settings) -> None:
    from tinyllm_vllm.model.sources import prepare

    print(prepare(a.src, a.out, revision=a.revision))


def cmd_demo_model(a: argparse.Namespace, s: Settings) -> None:
    from tinyllm_vllm.model.demo import SHAPE_92M, demo_model, random_model

    if a.random_92m:  # what the GPU benchmarks run: speed does not depend on the weights' values
        print(random_model(a.out, a.random_92m, SHAPE_92M))
    else:
        print(demo_model(a.out))


def cmd_generate(a: argparse.Namespace, s: Settings) -> None:
    from tinyllm_vllm.runtime import offline

    if a.input:
        from tinyllm_vllm.batch import BatchJob, run_batch

        if a.prompt:
            raise TinyllmError("generate: give prompts or --input FILE, not both")
        job = BatchJob(
            a.input,
            a.output,
            a.engines,
            a.max_tokens or s.max_tokens,
            a.temperature,
            a.top_p,
            a.seed,
            a.raw,
            a.in_flight,
        )
        if a.ray or a.ray_address or a.print_config:
            from tinyllm_vllm.ray_batch import processor_config, run_ray_batch

            if a.print_config:
                print(json.dumps(processor_config(_model(a.model, s), s, a.engines), indent=2))
                return
            run_ray_batch(_model(a.model, s), job, s, a.ray_address, echo=say)
            return
        run_batch(_model(a.model, s), job, s, echo=say)
        return
    if a.ray or a.ray_address or a.print_config:
        raise TinyllmError("generate: --ray, --ray-address and --print-config go with --input FILE")
    if not a.prompt:
        raise TinyllmError("generate: give one or more prompts, or --input prompts.jsonl --output out.jsonl")
    llm = offline.load_llm(_model(a.model, s), s, echo=say)
    try:
        params = offline.sampling(a.max_tokens or s.max_tokens, a.temperature, a.top_p, a.seed)
        rows = offline.complete(llm, a.prompt, params) if a.raw else offline.chat(llm, a.prompt, params)
        for r in rows:
            print(f"--- {r.prompt}\n{r.text}\n[{r.output_tokens} tokens, finish: {r.finish_reason}]", flush=True)
    finally:
        offline.close(llm, echo=say)


def _port(a: argparse.Namespace) -> int | None:
    """``procs.serve_port`` for --port, said in one line when vllm serve's 8000 is taken."""
    from tinyllm_vllm.runtime.procs import DEFAULT_PORT, serve_port

    port = serve_port(a.host, a.port)
    if a.port is None and port is None:
        say(f"port {DEFAULT_PORT} is taken: serving on a free port instead (--port sets one)")
    return port


def _deployment(a: argparse.Namespace, s: Settings, model: Path, replicas: str = "1") -> Any:
    from tinyllm_vllm.runtime.deploy import endpoint
    from tinyllm_vllm.runtime.plan import plan

    gpu = plan(s, replicas)  # decided once: the replicas get this plan, and its reason
    return endpoint(model, gpu, a.vllm_args, settings=s, api_key=a.api_key, host=a.host, port=_port(a), echo=say)


def _ray(a: argparse.Namespace, s: Settings, model: Path, replicas: str) -> Any:
    """``serve --ray``: the app on Ray Serve LLM, or with --print-config its Ray Serve config (no Ray needed)."""
    import importlib.util

    from tinyllm_vllm.runtime.cluster import RayServe, serve_config

    if a.vllm_args:
        raise TinyllmError(
            f"--ray: {' '.join(a.vllm_args)}: vLLM flags are not passed to Ray Serve LLM; "
            "use --print-config and edit engine_kwargs"
        )
    autoscale = tuple(a.autoscale) if a.autoscale else None
    if a.print_config:
        print(json.dumps(serve_config(model, s, replicas, autoscale, a.ray_throughput), indent=2))
        return None
    if s.device != "cuda" or importlib.util.find_spec("ray") is None:
        raise TinyllmError(
            "--ray needs Ray Serve LLM and the CUDA build of vLLM 0.26: pip install 'tinyllm-vllm[cuda,ray]' "
            "(on the CPU build Ray Serve LLM does not import; --print-config shows the app's config)"
        )
    return RayServe(
        model,
        replicas,
        settings=s,
        address=a.ray_address,
        host=a.host,
        port=_port(a),
        autoscale=autoscale,
        throughput=a.ray_throughput,
        echo=say,
    )


def cmd_serve(a: argparse.Namespace, s: Settings) -> None:
    replicas = a.replicas or ("auto" if s.device == "cuda" else "1")
    if replicas == "auto" and any(f.startswith(("--data-parallel", "--tensor-parallel")) for f in a.vllm_args):
        replicas = "1"  # vLLM's own parallelism spans the GPUs: one server
    ray = a.ray or a.ray_address or a.print_config or a.autoscale or a.ray_throughput
    server = _ray(a, s, _model(a.model, s), replicas) if ray else _deployment(a, s, _model(a.model, s), replicas)
    if server is None:
        return
    with _stopped_on_exit(server):
        server.start()
        print(f"serving {server.served_model_name} at {server.base_url}; Ctrl-C stops it", flush=True)
        while server.running:
            time.sleep(0.5)
        say(server.log_tail())
        raise TinyllmError(f"the server exited (log: {server.log_file})")


def cmd_route(a: argparse.Namespace, s: Settings) -> None:
    """vllm-router in front of vLLM servers that run elsewhere (other hosts): one OpenAI endpoint."""
    import httpx

    from tinyllm_vllm.runtime import logs
    from tinyllm_vllm.runtime.deploy import REMOTE_POLICY, REMOTE_POLICY_TEXT, Router, check_worker_urls

    workers = check_worker_urls(a.workers)
    for url in workers:
        try:
            up = httpx.get(url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            up = False
        say(f"worker {url}: {'healthy' if up else 'not answering yet (the router keeps checking)'}")
    log = logs.new_log_file(s.logs, "vllm-router")
    router = Router(workers, host=a.host, port=_port(a), policy=a.policy, log_file=log, router_args=REMOTE_POLICY)
    router.echo = say
    with _stopped_on_exit(router):
        router.start()
        say(f"policy: {a.policy}; {REMOTE_POLICY_TEXT} (log: {log})")
        print(f"routing at {router.url}/v1 over {len(workers)} workers; Ctrl-C stops it", flush=True)
        while router.running:
            time.sleep(0.5)
        raise TinyllmError(f"the router exited (log: {log})")


def cmd_chat(a: argparse.Namespace, s: Settings) -> None:
    from tinyllm_vllm.client import openai_client, terminal_chat

    server = None if a.url else _deployment(a, s, _model(a.model, s), a.replicas or "1")
    with _stopped_on_exit(server):
        if server:
            server.start()
        client = server.openai_client() if server else openai_client(a.url, a.api_key)
        name = server.served_model_name if server else client.models.list().data[0].id
        if a.web:
            from tinyllm_vllm.chat_ui import launch

            launch(client, name, host=a.host, share=a.share, block=True)
            return
        terminal_chat(client, name, max_tokens=a.max_tokens or s.max_tokens, temperature=a.temperature, top_p=a.top_p)


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
    from tinyllm_vllm.doctor import checks

    results = checks(a.model_dir)
    for c in results:
        print(c)
    sys.exit(0 if all(c.ok for c in results) else 1)


def cmd_bench(a: argparse.Namespace, s: Settings) -> None:
    from tinyllm_vllm.bench.commands import run

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
    p.add_argument(
        "--random-92m",
        metavar="TOKENIZER_MODEL",
        help="instead: random weights of the published 92M shape with this ChatGLM3 tokenizer.model "
        "(tests/data/chatglm3_tokenizer/tokenizer.model), for benchmarks",
    )
    p.set_defaults(fn=cmd_demo_model)

    def model_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="prepared dir, hub id, modelscope:ID, demo or auto (default: $TINYLLM_MODEL)")

    def sampling_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-tokens", type=int)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--top-p", type=float, default=1.0)

    p = sub.add_parser("generate", help="offline generation with vllm.LLM: prompts, or a JSONL file in batch")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--input", type=Path, help='JSONL of {"prompt": ...} or {"messages": [...]} rows')
    p.add_argument("--output", type=Path, help="with --input: results as JSONL, in input order (resumable)")
    p.add_argument("--engines", default="auto", help="with --input: engines sharing the GPU (default auto; 1 on a CPU)")
    p.add_argument(
        "--in-flight",
        type=int,
        help="with --input: requests each engine holds (default: twice the rows it runs in one step)",
    )
    p.add_argument("--raw", action="store_true", help="plain completion instead of the chat format")
    p.add_argument("--seed", type=int)
    model_arg(p)
    sampling_args(p)
    ray = p.add_argument_group("Ray Data LLM (the CUDA build of vLLM 0.26 and the ray extra)")
    ray.add_argument("--ray", action="store_true", help="with --input: run the batch on Ray Data LLM")
    ray.add_argument("--ray-address", help="with --input: on this Ray cluster (ray start --head ...) instead")
    ray.add_argument("--print-config", action="store_true", help="with --input: print the Ray processor's config")
    p.set_defaults(fn=cmd_generate)

    def server_args(p: argparse.ArgumentParser) -> None:
        model_arg(p)
        p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes the server to your network")
        p.add_argument("--port", type=int, help="default 8000 (vllm serve's), or a free port if 8000 is taken")
        p.add_argument("--api-key")
        p.add_argument(
            "--replicas",
            help="N servers sharing the GPU behind vllm-router, each with 1/N of the memory; auto (serve's "
            "default on a GPU) fills the GPU; 1 is one server",
        )

    p = sub.add_parser("serve", help="vLLM's OpenAI-compatible server on TinyLLM (other flags go to vllm serve)")
    server_args(p)
    ray = p.add_argument_group("Ray Serve LLM (the CUDA build of vLLM 0.26 and the ray extra)")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve LLM: --replicas on one GPU")
    ray.add_argument("--ray-address", help="join this Ray cluster (ray start --head ...) instead of starting one")
    ray.add_argument("--autoscale", type=int, nargs=2, metavar=("MIN", "MAX"), help="replicas between MIN and MAX")
    ray.add_argument(
        "--ray-throughput",
        action="store_true",
        help="Ray's high-throughput mode: gRPC between replicas, 4 ingress replicas per engine; HAProxy and "
        "direct streaming where the haproxy binary is installed",
    )
    ray.add_argument("--print-config", action="store_true", help="print the app's Ray Serve config and exit")
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

    p = sub.add_parser("route", help="vllm-router in front of vLLM servers on other hosts: one endpoint")
    p.add_argument("--workers", nargs="+", required=True, metavar="URL", help="http://HOST:PORT of each server")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes the router to your network")
    p.add_argument("--port", type=int, help="default 8000, or a free port if 8000 is taken")
    p.add_argument("--policy", default="round_robin", choices=["round_robin", "power_of_two", "cache_aware", "random"])
    p.set_defaults(fn=cmd_route)

    p = sub.add_parser("doctor", help="versions, device, vLLM build, plugin (and a prepared model): OK/FAIL")
    p.add_argument("model_dir", nargs="?", help="also check that this directory is a prepared model")
    p.set_defaults(fn=cmd_doctor)

    p = sub.add_parser("bench", help="benchmarks: offline engines, vLLM's own tools, serving, plots")
    from tinyllm_vllm.bench.commands import add_args

    add_args(p)
    p.set_defaults(fn=cmd_bench)
    return ap, passthrough


def main(argv: list[str] | None = None) -> None:
    # a background job of a non-interactive shell starts with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: Ctrl-C (or kill -INT) must stop the kit's commands however they were started
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
