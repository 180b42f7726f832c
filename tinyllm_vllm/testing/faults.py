"""Fault scenarios against real servers: each reports clearly and leaves no process behind.

Used by ``tests/test_reliability.py`` / ``tests/test_replicas.py`` (which assert) and by ``make
reliability`` (which prints). Traffic goes to 127.0.0.1 only, and every loop is bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tinyllm_vllm.client import metric
from tinyllm_vllm.errors import ServerError
from tinyllm_vllm.runtime.deploy import Replicas
from tinyllm_vllm.runtime.procs import group_members, wait_group_gone
from tinyllm_vllm.runtime.server import VLLMServer
from tinyllm_vllm.settings import Settings


def fault(name: str, fn: Callable[[], tuple[bool, str, list[int]]]) -> dict:
    """Run one fault scenario: ``fn`` returns (reported clearly, detail, process groups it started)."""
    t = time.monotonic()
    try:
        reported, detail, groups = fn()
    except Exception as e:  # a scenario that breaks is a finding, not a crash of the report
        reported, detail, groups = False, f"check itself failed: {e!r}", []
    left = [pid for g in groups for pid in group_members(g)]
    return {
        "fault": name,
        "reported": reported,
        "detail": detail[:300],
        "processes_left": len(left),
        "seconds": round(time.monotonic() - t, 1),
    }


def port_taken(model: str | Path, settings: Settings) -> tuple[bool, str, list[int]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        s = VLLMServer(model, settings=settings, port=sock.getsockname()[1], echo=None)
        try:
            s.start()
        except ServerError as e:
            first = str(e).splitlines()[0]
            return f"port {s.port}" in first and "already in use" in first, first, [s.proc.pid] if s.proc else []
        s.stop()
        return False, "started on a taken port", [s.proc.pid]


def not_a_checkpoint(work: Path, settings: Settings) -> tuple[bool, str, list[int]]:
    bad = work / "not-a-checkpoint"
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "config.json").write_text("{}")
    s = VLLMServer(bad, settings=settings, echo=None)
    try:
        s.start()
    except ServerError as e:
        # reported soon after the process's last words, not at the start-up timeout: the exit is seen by the
        # next 0.25 s poll (30 s leaves room for a loaded machine's interpreter teardown)
        quick = time.time() - os.stat(s.log_file).st_mtime < 30
        return quick and "exited with code" in str(e), str(e).splitlines()[0], [s.proc.pid]
    s.stop()
    return False, "started", [s.proc.pid]


def engine_killed(model: str | Path, settings: Settings) -> tuple[bool, str, list[int]]:
    s = VLLMServer(model, settings=settings, echo=None).start()
    front = s.proc.pid
    # the server's own processes: everything in the group but the watchdog and the front end
    engine = [p for p in group_members(front) if p != front and not _is_front(p, s)]
    for p in engine:
        os.kill(p, signal.SIGKILL)
    deadline, noticed = time.monotonic() + 60, False
    while time.monotonic() < deadline and not noticed:
        try:
            noticed = not s.running or httpx.get(s.url + "/health", timeout=5).status_code != 200
        except httpx.HTTPError:
            noticed = True
        time.sleep(0.5)
    s.stop()
    return noticed, f"killed {len(engine)} engine process(es); front end noticed: {noticed}", [front]


def _is_front(pid: int, server: VLLMServer) -> bool:
    try:
        return str(server.port) in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


def killed_during_start(model: str | Path, settings: Settings) -> tuple[bool, str, list[int]]:
    s = VLLMServer(model, settings=settings, echo=None).start(wait=False)
    time.sleep(5)
    os.kill(s.proc.pid, signal.SIGKILL)  # the watchdog only: the server gets its parent-death signal
    try:
        s.wait_ready(timeout=30)
        return False, "became ready", [s.proc.pid]
    except ServerError as e:
        gone = wait_group_gone(s.proc.pid, 30)
        s.stop()
        return "exited with code -9" in str(e) and gone, str(e).splitlines()[0], [s.proc.pid]


def kernel_interrupted_and_restarted(model: str | Path, settings: Settings) -> tuple[bool, str, list[int]]:
    """What Jupyter does: a cell starts a server, the user interrupts a long cell, then restarts the kernel;
    the server must live through the interrupt and not outlive the kernel."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    pid = None
    try:
        code = (
            f"from tinyllm_vllm.runtime.server import VLLMServer\nfrom tinyllm_vllm.settings import Settings\n"
            f"s = VLLMServer({str(model)!r}, settings=Settings(device='cpu', kv_cache_gb={settings.kv_cache_gb}, "
            f"max_model_len={settings.max_model_len}, home={str(settings.home)!r}), echo=None).start()\n"
            f"print(s.proc.pid)"
        )

        def grab(msg: dict) -> None:
            nonlocal pid
            if msg["msg_type"] == "stream" and msg["content"]["text"].strip().isdigit():
                pid = int(msg["content"]["text"].strip())

        kc.execute_interactive(code, timeout=300, output_hook=grab)
        msg_id = kc.execute("import time; time.sleep(120)")
        time.sleep(2)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=30)
        interrupted = reply["parent_header"].get("msg_id") == msg_id and reply["content"]["status"] == "error"
        kept = bool(pid and group_members(pid))
        km.restart_kernel(now=False)
        gone = bool(pid) and wait_group_gone(pid, 60)
        return (
            interrupted and kept and gone,
            f"interrupt reported: {interrupted}; server kept through the interrupt: {kept}; gone after restart: {gone}",
            [pid] if pid else [],
        )
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


async def _stream_many(
    base_url: str,
    model: str,
    n: int,
    max_tokens: int,
    hang_up_after: int | None,
    concurrency: int | None = None,
    started: set | None = None,
    ended: set | None = None,
) -> dict:
    """n streaming completions, at most ``concurrency`` at a time; with ``hang_up_after`` each client closes
    its connection after that many chunks. ``started`` and ``ended`` get each request's index when it is
    sent and when it is over; ``failed_ids`` lists failures."""
    results: dict = {"complete": 0, "failed": 0, "hung_up": 0, "failed_ids": []}
    started = set() if started is None else started
    ended = set() if ended is None else ended
    gate = asyncio.Semaphore(concurrency or n)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=httpx.Limits(max_connections=None)) as http:

        async def one(i: int) -> None:
            body = {
                "model": model,
                "prompt": f"你好 {i}",
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "seed": i,
                "stream": True,
                "ignore_eos": True,
            }
            async with gate:
                started.add(i)
                try:
                    async with http.stream("POST", "/completions", json=body) as r:
                        if r.status_code != 200:
                            results["failed"] += 1
                            results["failed_ids"].append(i)
                            return
                        chunks, done = 0, False
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                chunks += 1
                                done = line == "data: [DONE]"
                                if hang_up_after is not None and chunks >= hang_up_after:
                                    results["hung_up"] += 1
                                    return  # leaving the block closes the connection mid-stream
                        results["complete" if done else "failed"] += 1
                        if not done:
                            results["failed_ids"].append(i)
                except httpx.HTTPError:
                    results["failed"] += 1
                    results["failed_ids"].append(i)
                finally:
                    ended.add(i)

        await asyncio.gather(*(one(i) for i in range(n)))
    return results


def replica_killed_under_load(fleet: Replicas, n: int = 120, max_tokens: int = 32, concurrency: int = 16) -> dict:
    """Through the router, a steady stream of n requests (``concurrency`` at a time) while one replica is
    killed: a request under way at the kill may fail with it (a router cannot move a request a replica
    already holds), every request sent after it must complete, and the endpoint keeps answering."""

    router_metrics = f"http://{fleet.router.host}:{fleet.router.metrics_port}" if fleet.router.metrics_port else None
    counters = ("vllm_router_retries_total", "vllm_router_retries_exhausted_total", "vllm_router_request_errors_total")
    before = {c: metric(router_metrics, c) for c in counters} if router_metrics else {}

    started: set[int] = set()
    ended: set[int] = set()
    at_kill: set[int] = set()
    sent_by_kill = [0]

    async def run() -> dict:
        load = asyncio.create_task(
            _stream_many(fleet.base_url, fleet.served_model_name, n, max_tokens, None, concurrency, started, ended)
        )
        # the kill lands a quarter of the way into the load, however fast the machine sends it
        while len(started) < n // 4 and not load.done():
            await asyncio.sleep(0.01)
        victim = fleet.servers[-1]
        over = set(ended)
        os.killpg(victim.proc.pid, signal.SIGKILL)
        await asyncio.sleep(0.2)  # a request sent as the signal lands still meets the dying replica
        at_kill.update(started - over)
        sent_by_kill[0] = len(started)
        return await load

    r = asyncio.run(run())
    after = asyncio.run(_stream_many(fleet.base_url, fleet.served_model_name, 10, 4, None))
    gone = wait_group_gone(fleet.servers[-1].proc.pid, 30)
    # what the router did about it, from its own counters (retried to another replica, or given up)
    router = {c.removeprefix("vllm_router_"): metric(router_metrics, c) - before[c] for c in before}
    return {
        "router": router,
        "sent": n,
        "completed": r["complete"],
        "failed": r["failed"],
        "under_way_at_kill": len(at_kill),
        "sent_after_kill": n - sent_by_kill[0],
        "failed_not_under_way_at_kill": len(set(r["failed_ids"]) - at_kill),
        "lost": n - r["complete"],
        "answered_after": after["complete"],
        "killed_replica_gone": gone,
    }


def clients_hang_up(fleet: Replicas, n: int = 24, max_tokens: int = 500, direct: bool = False) -> dict:
    """Clients that close the connection mid-stream, through the router (or ``direct``ly to the first server).

    vLLM's ``/metrics`` tell what the engines did: how many of those requests still ran afterwards, how
    many finished as a normal request would (``vllm:request_success_total`` counts stop and length, not
    aborts: an aborted request does not count), how many tokens were generated of those asked for."""
    servers = [s for s in fleet.servers if s.running]
    url = servers[0].base_url if direct else fleet.base_url
    tokens_before = sum(metric(s, "vllm:generation_tokens_total") for s in servers)
    finished_before = sum(metric(s, "vllm:request_success_total") for s in servers)
    r = asyncio.run(_stream_many(url, fleet.served_model_name, n, max_tokens, hang_up_after=3))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(metric(s, "vllm:num_requests_running") for s in servers) > 0:
        time.sleep(0.5)
    time.sleep(1)  # a request still running would keep generating: give it the chance to show
    running = sum(metric(s, "vllm:num_requests_running") for s in servers)
    generated = sum(metric(s, "vllm:generation_tokens_total") for s in servers) - tokens_before
    finished = sum(metric(s, "vllm:request_success_total") for s in servers) - finished_before
    healthy = all(httpx.get(s.url + "/health", timeout=10).status_code == 200 for s in servers)
    return {
        "hung_up": r["hung_up"],
        "tokens_asked": n * max_tokens,
        "tokens_generated": generated,
        "finished_normally": finished,
        "running_after": running,
        "healthy_after": healthy,
    }
