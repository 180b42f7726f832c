"""Reliability and security checks against the real server, with a printed summary (``make reliability``).

* load: N mixed requests (completion / chat / streaming chat) from C concurrent ``openai`` async clients;
  every one must come back complete (``ignore_eos`` makes a truncated answer visible);
* bad requests: 20+ kinds of malformed input must each get a 4xx with a message, and the server must
  keep answering good requests;
* auth: with an API key, ``/v1/*`` needs it (401 otherwise) while ``/health`` stays open;
* faults: a port already taken, a directory that is not a prepared checkpoint, the engine killed while
  serving, the server killed during start: each reported, nothing left running.

All traffic goes to 127.0.0.1 only, and every loop is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import time
from pathlib import Path

import httpx

from .server import ServerError, VLLMServer
from .settings import Settings


# --- processes ---------------------------------------------------------------------------------------

def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, read from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def wait_group_gone(pgid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return True
        time.sleep(0.2)
    return False


# --- load ----------------------------------------------------------------------------------------------

async def _load(base_url: str, model: str, n: int, concurrency: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=300)
    sem = asyncio.Semaphore(concurrency)
    extra = {"ignore_eos": True}

    async def one(i: int) -> tuple[str, bool, float]:
        kind = ("completion", "chat", "stream")[i % 3]
        async with sem:
            t = time.perf_counter()
            try:
                if kind == "completion":
                    r = await client.completions.create(model=model, prompt=f"你好 {i}", max_tokens=max_tokens,
                                                        temperature=0.8, seed=i, extra_body=extra)
                    ok = r.usage.completion_tokens == max_tokens and r.choices[0].finish_reason == "length"
                elif kind == "chat":
                    r = await client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": f"第{i}个问题"}], max_tokens=max_tokens,
                        temperature=0.8, seed=i, extra_body=extra)
                    ok = r.usage.completion_tokens == max_tokens and r.choices[0].finish_reason == "length"
                else:
                    stream = await client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": f"第{i}个问题"}], max_tokens=max_tokens,
                        temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True},
                        extra_body=extra)
                    usage, finish = None, None
                    async for chunk in stream:
                        if chunk.usage:
                            usage = chunk.usage
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
    return {"sent": n, "answered": answered, "lost": n - answered, "concurrency": concurrency,
            "elapsed_s": round(elapsed, 2), "requests_per_s": round(n / elapsed, 1),
            "output_tok_s": round(answered * max_tokens / elapsed, 1),
            "latency_s_p50": round(statistics.median(lat), 3), "latency_s_p99": round(lat[int(0.99 * (n - 1))], 3),
            "latency_s_max": round(lat[-1], 3)}


def load(server: VLLMServer, n: int = 500, concurrency: int = 64, max_tokens: int = 16) -> dict:
    """Mixed load; then the server must still be healthy."""
    r = asyncio.run(_load(server.base_url, server.served_model_name, n, concurrency, max_tokens))
    r["healthy_after"] = httpx.get(server.url + "/health", timeout=10).status_code == 200
    return r


# --- bad requests ------------------------------------------------------------------------------------------

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
        "content of wrong type": ("POST", "/v1/chat/completions", chat | {"messages": [{"role": "user", "content": 42}]}),
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
            good = http.post("/v1/completions", json={"model": server.served_model_name, "prompt": "你好",
                                                       "max_tokens": 2}).status_code == 200
            results.append({"kind": kind, "status": r.status_code, "message": " ".join(message.split()),
                            "good_after": good})
    return {"tried": len(results), "answered_4xx": sum(400 <= r["status"] < 500 and bool(r["message"]) for r in results),
            "answered_5xx": sum(r["status"] >= 500 for r in results),
            "server_up": all(r["good_after"] for r in results), "results": results}


# --- auth --------------------------------------------------------------------------------------------------

def auth(model: str | Path, settings: Settings, key: str = "s3cret-test-key") -> dict:
    """Start a server with an API key and probe it with no key, a wrong key and the right key."""
    with VLLMServer(model, settings=settings, api_key=key) as s:
        def get(path, token=None):
            return httpx.get(s.url + path, headers={"Authorization": f"Bearer {token}"} if token else {},
                             timeout=30).status_code

        r = {"bound_to": s.host, "models_no_key": get("/v1/models"), "models_wrong_key": get("/v1/models", "nope"),
             "models_right_key": get("/v1/models", key), "health_no_key": get("/health"),
             "completion_no_key": httpx.post(s.url + "/v1/completions", json={"model": s.served_model_name,
                                             "prompt": "hi", "max_tokens": 2}, timeout=30).status_code}
    r["ok"] = (r["models_no_key"] == r["models_wrong_key"] == r["completion_no_key"] == 401
               and r["models_right_key"] == 200 and r["health_no_key"] == 200 and r["bound_to"] == "127.0.0.1")
    return r


# --- faults --------------------------------------------------------------------------------------------------

def _fault(name: str, fn) -> dict:
    t = time.monotonic()
    try:
        reported, detail, pgid = fn()
    except Exception as e:  # a fault check that breaks is a finding, not a crash of the report
        reported, detail, pgid = False, f"check itself failed: {e!r}", None
    left = group_members(pgid) if pgid else []
    return {"fault": name, "reported": reported, "detail": detail[:200], "processes_left": len(left),
            "seconds": round(time.monotonic() - t, 1)}


def faults(model: str | Path, settings: Settings, not_prepared: Path) -> dict:
    """Each fault must be reported clearly and leave no process of the server's group behind."""

    def port_taken():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            s = VLLMServer(model, settings=settings, port=sock.getsockname()[1])
            try:
                s.start()
                return False, "started on a taken port", s.proc.pid
            except ServerError as e:
                s.stop()
                return "already in use" in s.log_tail(200).lower(), str(e).splitlines()[0], s.proc.pid

    def not_a_checkpoint():
        s = VLLMServer(not_prepared, settings=settings)
        try:
            s.start()
            return False, "started", s.proc.pid
        except ServerError as e:
            return "exited with code" in str(e), str(e).splitlines()[0], s.proc.pid

    def engine_killed():
        s = VLLMServer(model, settings=settings).start()
        pgid = s.proc.pid
        engine = [p for p in group_members(pgid) if p != pgid]
        for p in engine:
            os.kill(p, signal.SIGKILL)
        # the front end notices its engine is gone: /health stops answering 200 or the process exits
        deadline = time.monotonic() + 60
        noticed = False
        while time.monotonic() < deadline and not noticed:
            try:
                noticed = not s.running or httpx.get(s.url + "/health", timeout=5).status_code != 200
            except httpx.HTTPError:
                noticed = True
            time.sleep(0.5)
        s.stop()
        return noticed, f"killed {len(engine)} engine process(es); front end noticed: {noticed}", pgid

    def killed_during_start():
        s = VLLMServer(model, settings=settings).start(wait=False)
        time.sleep(5)
        os.kill(s.proc.pid, signal.SIGKILL)  # the front end only: its children stay in the group
        try:
            s.wait_ready(timeout=30)
            return False, "became ready", s.proc.pid
        except ServerError as e:
            s.stop()
            return "exited with code -9" in str(e), str(e).splitlines()[0], s.proc.pid

    def kernel_interrupted_and_restarted():
        # what Jupyter does: a kernel runs a notebook cell that starts a server, the user interrupts a
        # long cell, then restarts the kernel; the server must not outlive the kernel
        from jupyter_client.manager import start_new_kernel

        km, kc = start_new_kernel(kernel_name="python3")
        try:
            code = (f"from tinyllm_vllm.server import VLLMServer\nfrom tinyllm_vllm.settings import Settings\n"
                    f"s = VLLMServer({str(model)!r}, settings=Settings(device='cpu', kv_cache_gb={settings.kv_cache_gb},"
                    f" max_model_len={settings.max_model_len}).resolved()).start()\nprint(s.proc.pid)")
            pid = None

            def grab(msg):
                nonlocal pid
                if msg["msg_type"] == "stream" and msg["content"]["text"].strip().isdigit():
                    pid = int(msg["content"]["text"].strip())

            kc.execute_interactive(code, timeout=300, output_hook=grab)
            msg_id = kc.execute("import time; time.sleep(120)")
            time.sleep(2)
            km.interrupt_kernel()
            reply = kc.get_shell_msg(timeout=30)
            interrupted = reply["parent_header"].get("msg_id") == msg_id and reply["content"]["status"] == "error"
            alive_after_interrupt = bool(pid and group_members(pid))
            km.restart_kernel(now=False)
            gone = bool(pid) and wait_group_gone(pid, 60)
            return (interrupted and gone, f"interrupt reported: {interrupted}; server kept through the "
                    f"interrupt: {alive_after_interrupt}; gone after restart: {gone}", pid)
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)

    checks = [_fault("port already taken", port_taken), _fault("not a prepared checkpoint", not_a_checkpoint),
              _fault("engine killed while serving", engine_killed),
              _fault("server killed during start", killed_during_start),
              _fault("kernel interrupted, then restarted", kernel_interrupted_and_restarted)]
    return {"tried": len(checks), "handled": sum(c["reported"] and not c["processes_left"] for c in checks),
            "processes_left": sum(c["processes_left"] for c in checks), "results": checks}


# --- report ---------------------------------------------------------------------------------------------------

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
        f"faults:       {fa['tried']} tried / {fa['handled']} handled / {fa['processes_left']} processes left",
    ]
    for r in br["results"]:
        lines.append(f"  {r['status']}  {r['kind']}: {r['message'][:90]}")
    for r in fa["results"]:
        lines.append(f"  {'ok ' if r['reported'] and not r['processes_left'] else 'BAD'} {r['fault']} "
                     f"({r['seconds']} s): {r['detail'][:100]}")
    return "\n".join(lines)


def run_all(model: str | Path, settings: Settings, work: Path) -> dict:
    bad_dir = work / "not-a-checkpoint"
    bad_dir.mkdir(parents=True, exist_ok=True)
    (bad_dir / "config.json").write_text("{}")
    with VLLMServer(model, settings=settings) as server:
        report = {"load": load(server), "bad_requests": bad_requests(server)}
    report["auth"] = auth(model, settings)
    report["faults"] = faults(model, settings, bad_dir)
    return report


def main() -> None:
    from .checkpoint import ensure_model

    s = Settings.from_env()
    model, note = ensure_model(s.model, s.home)
    print(f"model: {note}", flush=True)
    report = run_all(model, s, s.home / "reliability")
    out = s.home / "reliability.json"
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(summary(report))
    print(f"(full report: {out})")
    groups = {"load": report["load"]["lost"] == 0 and report["load"]["healthy_after"],
              "bad requests": report["bad_requests"]["answered_4xx"] == report["bad_requests"]["tried"]
              and report["bad_requests"]["server_up"],
              "auth": report["auth"]["ok"],
              "faults": report["faults"]["handled"] == report["faults"]["tried"]
              and report["faults"]["processes_left"] == 0}
    failed = [name for name, ok in groups.items() if not ok]
    if failed:
        print("failed:", ", ".join(failed))
    print(f"reliability: {len(groups) - len(failed)} passed, {len(failed)} failed")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
