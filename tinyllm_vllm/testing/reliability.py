"""Reliability and security checks against real servers: one code path for the tests and the summary.

``tests/test_reliability.py`` asserts on each check (``make test``); ``make reliability`` runs them
all and prints a summary. Every check sends traffic to 127.0.0.1 only and every loop is bounded.

* load: N mixed requests (completion / chat / streaming chat) from C concurrent ``openai`` clients;
  every one must come back complete (``ignore_eos`` makes a truncated answer visible);
* bad requests: 26 kinds of malformed input must each get a 4xx with a message, and the server
  must keep answering good requests;
* auth: with an API key, ``/v1/*`` needs it (401 otherwise) while ``/health`` stays open;
* faults (``faults``): a port already taken, a directory that is not a prepared checkpoint, the
  engine killed while serving, the server killed during start, a Jupyter kernel interrupted then
  restarted, a replica killed under load behind the router, clients that hang up mid-stream. Each
  must be reported clearly and leave no process behind.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from tinyllm_vllm.runtime.deploy import Replicas
from tinyllm_vllm.runtime.server import VLLMServer
from tinyllm_vllm.settings import Settings
from tinyllm_vllm.testing import faults

# --- load ----------------------------------------------------------------------------------------------


async def _load(base_url: str, model: str, n: int, concurrency: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=300)
    sem = asyncio.Semaphore(concurrency)
    extra = {"ignore_eos": True}

    async def one(i: int) -> tuple[str, bool, float]:
        kind = ("completion", "chat", "stream")[i % 3]
        messages = [{"role": "user", "content": f"第{i}个问题"}]
        async with sem:
            t = time.perf_counter()
            try:
                if kind == "completion":
                    r = await client.completions.create(
                        model=model,
                        prompt=f"你好 {i}",
                        max_tokens=max_tokens,
                        temperature=0.8,
                        seed=i,
                        extra_body=extra,
                    )
                    ok = r.usage.completion_tokens == max_tokens and r.choices[0].finish_reason == "length"
                elif kind == "chat":
                    r = await client.chat.completions.create(
                        model=model, messages=messages, max_tokens=max_tokens, temperature=0.8, seed=i, extra_body=extra
                    )
                    ok = r.usage.completion_tokens == max_tokens and r.choices[0].finish_reason == "length"
                else:
                    stream = await client.chat.completions.create(
                        model=model,
                        messages=messages,
                        max_tokens=max_tokens,
                        temperature=0.8,
                        seed=i,
                        stream=True,
                        stream_options={"include_usage": True},
                        extra_body=extra,
                    )
                    usage, finish = None, None
                    async for chunk in stream:
                        usage = chunk.usage or usage
                        if chunk.choices and chunk.choices[0].finish_reason:
                            finish = chunk.choices[0].finish_reason
                    ok = usage is not None and usage.completion_tokens == max_tokens and finish == "length"
            except openai.OpenAIError:
                ok = False
            return kind, ok, time.perf_counter() - t

    t = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - t
    await client.close()
    lat = sorted(r[2] for r in results)
    answered = sum(ok for _, ok, _ in results)
    return {
        "sent": n,
        "answered": answered,
        "lost": n - answered,
        "concurrency": concurrency,
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(n / elapsed, 1),
        "latency_s_p50": round(statistics.median(lat), 3),
        "latency_s_p99": round(lat[int(0.99 * (n - 1))], 3),
    }


def load(server: VLLMServer, n: int = 500, concurrency: int = 64, max_tokens: int = 16) -> dict:
    """Mixed load; then the server must still be healthy."""
    r = asyncio.run(_load(server.base_url, server.served_model_name, n, concurrency, max_tokens))
    r["healthy_after"] = httpx.get(server.url + "/health", timeout=10).status_code == 200
    return r


# --- bad requests ---------------------------------------------------------------------------------------


def bad_request_kinds(model: str, max_model_len: int) -> dict[str, tuple[str, str, object]]:
    """kind -> (method, path, body); a ``bytes`` body is sent raw, anything else as JSON."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    comp = {"model": model, "prompt": "hi", "max_tokens": 4}
    return {
        "malformed JSON": ("POST", "/v1/completions", b'{"model": "x", "prompt": '),
        "body is a JSON list": ("POST", "/v1/completions", [comp]),
        "unknown model name": ("POST", "/v1/completions", comp | {"model": "gpt-4"}),
        "completion without prompt": ("POST", "/v1/completions", {"model": model, "max_tokens": 4}),
        "chat without messages": ("POST", "/v1/chat/completions", {"model": model, "max_tokens": 4}),
        "prompt of wrong type": ("POST", "/v1/completions", comp | {"prompt": {"text": "hi"}}),
        "max_tokens of wrong type": ("POST", "/v1/completions", comp | {"max_tokens": "many"}),
        "negative max_tokens": ("POST", "/v1/completions", comp | {"max_tokens": -1}),
        "max_tokens beyond model length": ("POST", "/v1/completions", comp | {"max_tokens": 10 * max_model_len}),
        "prompt longer than model length": ("POST", "/v1/completions", comp | {"prompt": "你好" * 2 * max_model_len}),
        "empty messages": ("POST", "/v1/chat/completions", chat | {"messages": []}),
        "message without role": ("POST", "/v1/chat/completions", chat | {"messages": [{"content": "hi"}]}),
        "unknown role": ("POST", "/v1/chat/completions", chat | {"messages": [{"role": "wizard", "content": "hi"}]}),
        "messages not a list": ("POST", "/v1/chat/completions", chat | {"messages": "hi"}),
        "content of wrong type": (
            "POST",
            "/v1/chat/completions",
            chat | {"messages": [{"role": "user", "content": 42}]},
        ),
        "negative temperature": ("POST", "/v1/completions", comp | {"temperature": -1}),
        "top_p above 1": ("POST", "/v1/completions", comp | {"top_p": 1.5}),
        "n = 0": ("POST", "/v1/completions", comp | {"n": 0}),
        "absurd logprobs": ("POST", "/v1/completions", comp | {"logprobs": 10_000}),
        "absurd top_logprobs": ("POST", "/v1/chat/completions", chat | {"logprobs": True, "top_logprobs": 10_000}),
        "presence_penalty out of range": ("POST", "/v1/completions", comp | {"presence_penalty": 50}),
        "stop of wrong type": ("POST", "/v1/completions", comp | {"stop": 12}),
        "stream not a boolean": ("POST", "/v1/completions", comp | {"stream": "yes please"}),
        "oversized body (32 MiB)": ("POST", "/v1/completions", comp | {"prompt": "x" * (32 << 20)}),
        "unknown endpoint": ("POST", "/v1/teleport", comp),
        "GET on a POST endpoint": ("GET", "/v1/completions", None),
    }


def bad_requests(server: VLLMServer) -> dict:
    """Send every bad kind; each must get a 4xx with a message, and good requests must still work."""
    results = []
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for kind, (method, path, body) in bad_request_kinds(server.served_model_name, server.max_model_len).items():
            if isinstance(body, bytes):
                r = http.request(method, path, content=body, headers={"Content-Type": "application/json"})
            elif body is None:
                r = http.request(method, path)
            else:
                r = http.request(method, path, content=json.dumps(body), headers={"Content-Type": "application/json"})
            try:
                payload = r.json()
                message = str((payload.get("error") or {}).get("message") or payload.get("detail") or payload)[:160]
            except (ValueError, AttributeError):
                message = r.text[:160]
            good = (
                http.post(
                    "/v1/completions", json={"model": server.served_model_name, "prompt": "你好", "max_tokens": 2}
                ).status_code
                == 200
            )
            results.append(
                {"kind": kind, "status": r.status_code, "message": " ".join(message.split()), "good_after": good}
            )
    return {
        "tried": len(results),
        "answered_4xx": sum(400 <= r["status"] < 500 and bool(r["message"]) for r in results),
        "answered_5xx": sum(r["status"] >= 500 for r in results),
        "server_up": all(r["good_after"] for r in results),
        "results": results,
    }


# --- auth -------------------------------------------------------------------------------------------------


def auth(model: str | Path, settings: Settings, key: str = "s3cret-test-key") -> dict:
    """Start a server with an API key and probe it with no key, a wrong key and the right key."""
    with VLLMServer(model, settings=settings, api_key=key, echo=None) as s:

        def get(path: str, token: str | None = None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return httpx.get(s.url + path, headers=headers, timeout=30).status_code

        r = {
            "bound_to": s.host,
            "models_no_key": get("/v1/models"),
            "models_wrong_key": get("/v1/models", "nope"),
            "models_right_key": get("/v1/models", key),
            "health_no_key": get("/health"),
            "completion_no_key": httpx.post(
                s.url + "/v1/completions",
                json={"model": s.served_model_name, "prompt": "hi", "max_tokens": 2},
                timeout=30,
            ).status_code,
        }
    r["ok"] = (
        r["models_no_key"] == r["models_wrong_key"] == r["completion_no_key"] == 401
        and r["models_right_key"] == 200
        and r["health_no_key"] == 200
        and r["bound_to"] == "127.0.0.1"
    )
    return r


# --- the printed summary (make reliability) ----------------------------------------------------------------


def summary(report: dict) -> str:
    lo, br, fa, au = report["load"], report["bad_requests"], report["faults"], report["auth"]
    lines = [
        f"load:         {lo['sent']} sent / {lo['answered']} answered / {lo['lost']} lost "
        f"({lo['concurrency']} concurrent, {lo['requests_per_s']} req/s, latency p50 {lo['latency_s_p50']} s, "
        f"p99 {lo['latency_s_p99']} s; healthy after: {lo['healthy_after']})",
        f"bad requests: {br['tried']} kinds tried / {br['answered_4xx']} answered 4xx / {br['answered_5xx']} 5xx / "
        f"server still up: {br['server_up']}",
        f"auth:         no key {au['models_no_key']}, wrong key {au['models_wrong_key']}, right key "
        f"{au['models_right_key']}, /health without key {au['health_no_key']}, bound to {au['bound_to']}",
        f"faults:       {len(fa)} tried / {sum(f['reported'] and not f['processes_left'] for f in fa)} handled / "
        f"{sum(f['processes_left'] for f in fa)} processes left",
    ]
    lines += [f"  {r['status']}  {r['kind']}: {r['message'][:90]}" for r in br["results"]]
    lines += [
        f"  {'ok ' if f['reported'] and not f['processes_left'] else 'BAD'} {f['fault']} ({f['seconds']} s): "
        f"{f['detail'][:110]}"
        for f in fa
    ]
    rk, hu = report["router"]["replica_killed"], report["router"]["clients_hang_up"]
    lines += [
        f"router:       replica killed under load: {rk['sent']} sent / {rk['completed']} completed / "
        f"{rk['failed']} failed, {rk['answered_after']}/10 answered after; clients hung up: {hu['hung_up']}, "
        f"{hu['finished_normally']:.0f} ran to their end anyway (the router did not pass the hang-up on), "
        f"{hu['tokens_generated']:.0f} of {hu['tokens_asked']} tokens generated, {hu['running_after']:.0f} still "
        f"running after, healthy: {hu['healthy_after']}"
    ]
    return "\n".join(lines)


def run_all(model: str | Path, settings: Settings, work: Path) -> dict:
    with VLLMServer(model, settings=settings, echo=None) as server:
        report: dict[str, Any] = {"load": load(server), "bad_requests": bad_requests(server)}
    report["auth"] = auth(model, settings)
    report["faults"] = [
        faults.fault("port already taken", lambda: faults.port_taken(model, settings)),
        faults.fault("not a prepared checkpoint", lambda: faults.not_a_checkpoint(work, settings)),
        faults.fault("engine killed while serving", lambda: faults.engine_killed(model, settings)),
        faults.fault("server killed during start", lambda: faults.killed_during_start(model, settings)),
        faults.fault(
            "kernel interrupted, then restarted", lambda: faults.kernel_interrupted_and_restarted(model, settings)
        ),
    ]
    with Replicas(model, 2, settings=settings, echo=None) as fleet:
        fleet.wait_all()
        hung = faults.clients_hang_up(fleet)
        killed = faults.replica_killed_under_load(fleet)
    report["router"] = {"clients_hang_up": hung, "replica_killed": killed}
    return report


def main() -> None:
    from tinyllm_vllm.model.sources import ensure_model

    s = Settings.from_env()
    model, note = ensure_model(s.model, s.home, verbose=s.verbose)
    print(f"model: {note}", flush=True)
    report = run_all(model, s, s.home / "reliability")
    out = s.home / "reliability.json"
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(summary(report))
    print(f"(full report: {out})")
    rk, hu = report["router"]["replica_killed"], report["router"]["clients_hang_up"]
    groups = {
        "load": report["load"]["lost"] == 0 and report["load"]["healthy_after"],
        "bad requests": report["bad_requests"]["answered_4xx"] == report["bad_requests"]["tried"]
        and report["bad_requests"]["server_up"],
        "auth": report["auth"]["ok"],
        "faults": all(f["reported"] and not f["processes_left"] for f in report["faults"]),
        "router": rk["answered_after"] == 10
        and rk["killed_replica_gone"]
        and hu["running_after"] == 0
        and hu["tokens_generated"] < hu["tokens_asked"]
        and hu["healthy_after"],
    }
    failed = [name for name, ok in groups.items() if not ok]
    if failed:
        print("failed:", ", ".join(failed))
    print(f"reliability: {len(groups) - len(failed)} passed, {len(failed)} failed")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
