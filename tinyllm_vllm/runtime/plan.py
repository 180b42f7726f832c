"""How many engines share one GPU, with which options (``plan``), the one memory-share rule (``share``), and
on a CPU which cores each of several engines runs on (``cores_env``).

``tinyllm-vllm serve`` (``--replicas auto`` on a GPU), ``generate --input`` and ``bench one-gpu`` all use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tinyllm_vllm.errors import SettingsError
from tinyllm_vllm.settings import Settings

# What fills one GPU with this model, as measured on an H200 with 16 cores by `bench one-gpu`'s plan scan: one
# offline engine is paced by its own CPU threads and keeps the card busy 13-17% of the time; 4 side by side made
# 143k useful tok/s, 8 made 175k with nvidia-smi's utilization at 99.7% (a later run of the 8 alone, the one in
# results/gpu/one_gpu.json: 176k). Serving replicas were measured at 4 (each adds API servers, so 4 busy
# processes a replica); 8 replicas were not measured.
USEFUL_ENGINES_PER_GPU = 8  # offline engines (``generate --input``, the benchmarks)
USEFUL_REPLICAS_PER_GPU = 4  # servers behind one router
CORES_PER_ENGINE = 2  # busy processes of one offline engine: its front end (the feeding loop) and engine core
CORES_PER_REPLICA = 4  # busy processes of one replica: its API servers, the engine core, the GPU worker
GIB_PER_ENGINE = 8  # weights, activations, CUDA graphs and a KV cache ample for 1024 sequences of this model


@dataclass(frozen=True)
class GpuPlan:
    """How many engines share the machine's GPU, with which options, and why (one line)."""

    engines: int
    api_server_count: int
    engine_options: dict[str, Any]
    why: str


def gpu_memory_gib() -> float | None:
    """Total memory of the first GPU in GiB, or None without one (nvidia-smi, read once a process)."""
    from tinyllm_vllm.runtime.procs import gpus

    found = gpus()
    return found[0]["memory_gib"] if found else None


def plan(
    settings: Settings, engines: int | str | GpuPlan = "auto", light: bool = False, offline: bool = False
) -> GpuPlan:
    """Engines for one GPU: ``auto`` takes the fewest of what the CPU cores, the GPU memory and the measured
    useful count allow, for offline engines (``offline``: the batch, the benchmarks) or for servers behind a
    router. On a CPU there is one engine: its cores are the limit already.

    ``light`` starts each engine with vLLM's own process layout for one GPU (one API server, the model in
    the engine core's process): fewer processes import vLLM, so engines starting together are ready
    sooner, at the cost of throughput under full load (the walkthrough's replicas use it).

    A plan already decided (a ``GpuPlan``) is returned as it is: a command plans once and hands the plan down."""
    if isinstance(engines, GpuPlan):
        return engines
    if engines != "auto" and not (str(engines).isdigit() and int(engines) >= 1):
        raise SettingsError(f"{engines!r} engines or replicas: expected a number of at least 1, or auto")
    cores = len(os.sched_getaffinity(0))
    if settings.device != "cuda":
        n = 1 if engines == "auto" else int(engines)
        return GpuPlan(n, 1, {}, f"{n} engine{'s' if n > 1 else ''} on the CPU ({cores} cores)")
    memory = gpu_memory_gib() or 0.0
    by_cores = max(1, cores // (CORES_PER_ENGINE if offline else CORES_PER_REPLICA))
    by_memory = max(1, int(memory * settings.gpu_util // GIB_PER_ENGINE))
    useful = USEFUL_ENGINES_PER_GPU if offline else USEFUL_REPLICAS_PER_GPU
    if engines == "auto":
        n = min(by_cores, by_memory, useful)
        measured = "8 offline engines made the most on an H200" if offline else "more than 4 replicas were not measured"
        why = (
            f"{n} {'engines' if offline else 'replicas'}: {cores} CPU cores allow {by_cores}, "
            f"{memory * settings.gpu_util:.0f} GiB of GPU memory allow {by_memory}, and {measured}"
        )
    else:
        n, why = int(engines), f"{engines} engines, as asked"
    if light:
        return GpuPlan(n, 1, {}, why + "; a light start: 1 API server each, the model in the engine's process")
    api_servers = max(1, min(4, cores // n - 2))
    # the model runs in its own worker process, so the engine core schedules the next step meanwhile
    if not offline:  # an offline engine has no API server
        why += f"; {api_servers} API server{'s' if api_servers > 1 else ''} each"
    return GpuPlan(n, api_servers, {"distributed_executor_backend": "mp"}, why)


def share(settings: Settings, n: int) -> Settings:
    """The one memory-share rule for ``n`` engines on one device: each gets 1/n of the budget. On a GPU the
    share is also a fixed KV-cache size, so the engines can start at the same time (vLLM sizes the cache
    by profiling memory otherwise, and engines profiling together see each other's allocations)."""
    if n == 1:
        return settings
    if settings.device == "cpu":
        return settings.replace(kv_cache_gb=settings.kv_cache_gb / n)
    memory = gpu_memory_gib()
    kv = memory * settings.gpu_util / n / 2 if memory else None  # half of each share for the KV cache
    return settings.replace(gpu_util=settings.gpu_util / n, gpu_kv_cache_gb=kv)


BIND = "VLLM_CPU_OMP_THREADS_BIND"


def cores_env(settings: Settings, k: int, n: int) -> dict[str, str]:
    """The CPU cores engine ``k`` of ``n`` binds its threads to, as vLLM's ``VLLM_CPU_OMP_THREADS_BIND``.

    vLLM's own binding (``auto``) sees only its own engine: on 2 cores every engine binds to core 0 and keeps
    core 1 for its front end, so n engines the kit starts side by side would all run on core 0 (measured: a
    second replica took minutes to start while the first served). The machine's cores are split into n
    groups instead (engines share cores round robin when there are more engines than cores). One engine, a
    GPU, or a binding set by the user: vLLM decides, as without the kit."""
    if n == 1 or settings.device != "cpu" or os.environ.get(BIND):
        return {}
    cores = sorted(os.sched_getaffinity(0))
    if n >= len(cores):
        group = [cores[k % len(cores)]]
    else:
        size, extra = divmod(len(cores), n)
        start = k * size + min(k, extra)
        group = cores[start : start + size + (k < extra)]
    return {BIND: ",".join(map(str, group))}
