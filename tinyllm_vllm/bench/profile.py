"""Where one engine's time goes: a py-spy profile of the engine core at steady state, summarised by frame.

``profile_engine`` starts a vLLM engine in its own process (as the benchmarks do), lets it warm up,
then starts the timed run and records every process of the engine (``py-spy record --subprocesses
--format raw``) for a few seconds while it runs. ``summarize`` reads the raw (collapsed) stacks of
the engine core process (and of the front process that feeds it) and gives each frame's share of its
samples, inclusive and self.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from tinyllm_vllm.bench import engines
from tinyllm_vllm.runtime import logs, procs


def py_spy() -> str:
    """The py-spy executable: on PATH, beside this Python, or in a ``bin`` folder of an install target."""
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    for entry in [] if found else sys.path:
        candidate = Path(entry) / "bin" / "py-spy"
        if candidate.is_file():
            found = str(candidate)
            break
    if not found:
        raise FileNotFoundError("py-spy not found: pip install py-spy")
    return found


def samples(raw: str | Path) -> Iterator[tuple[str, list[str], int]]:
    """(process name, its frames root first, count) for each stack of a raw py-spy file.

    A raw py-spy line is ``root;caller;...;leaf COUNT``; with ``--subprocesses`` it starts with the chain of
    processes down to the sampled one (``process 12:"python ...";process 34:"VLLM::EngineCore";...``)."""
    for line in Path(raw).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        owners = [i for i, f in enumerate(frames) if f.startswith("process ")]
        if owners and count.isdigit():
            name = frames[owners[-1]].split(":", 1)[-1].strip('"')
            yield name, frames[owners[-1] + 1 :], int(count)


def summarize(raw: str | Path, process: str = "EngineCore", top: int = 15) -> dict:
    """Share of samples per frame, inclusive and self, in the processes whose name contains ``process``."""
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for name, frames, n in samples(raw):
        if process not in name or not frames:
            continue
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        leaf[frames[-1]] += n
    if not total:
        return {"process": process, "samples": 0, "inclusive": [], "self": []}

    def table(counter: Counter[str]) -> list[dict]:
        ranked = sorted(counter.items(), key=lambda fc: (-fc[1], fc[0]))[:top]  # ties by name: reproducible
        return [{"frame": f, "share": round(c / total, 4)} for f, c in ranked]

    return {"process": process, "samples": total, "inclusive": table(inclusive), "self": table(leaf)}


def under(raw: str | Path, parent: str, process: str = "EngineCore") -> dict[str, float]:
    """Share of the process's samples spent in each direct callee of the first frame that starts with
    ``parent`` (for the engine core, ``EngineCore.step``: scheduling, running the model, reading its output).
    Samples outside ``parent`` count as "(outside)", those in it with no callee as "(self)"."""
    count: Counter[str] = Counter()
    for name, frames, n in samples(raw):
        if process not in name:
            continue
        at = next((i for i, f in enumerate(frames) if f.startswith(parent)), None)
        key = "(outside)" if at is None else frames[at + 1] if at + 1 < len(frames) else "(self)"
        count[key] += n
    total = sum(count.values()) or 1
    return {frame: round(c / total, 4) for frame, c in count.most_common()}


def busy(raw: str | Path, seconds: float, rate: int) -> dict[str, float]:
    """Per process (by name), samples per sampling tick: py-spy samples only threads that are running, so
    1.0 means one thread of that process on a CPU all the time."""
    ticks = max(1.0, seconds * rate)
    count: Counter[str] = Counter()
    for name, _, n in samples(raw):
        count[name] += n
    return {name: round(c / ticks, 3) for name, c in count.most_common()}


def profile_engine(
    spec: engines.EngineSpec, seconds: float, out_raw: str | Path, delay: float = 2.0, rate: int = 100
) -> dict:
    """Run ``spec`` (a vLLM engine, see ``engines``) and record it with py-spy for ``seconds`` once warm.

    Returns the engine's result, the py-spy command and the summary of the engine core's samples."""
    log = logs.new_log_file(engines.bench_logs(), "bench-profile")
    engine = engines.start_lockstep(replace(spec, repeats=1), log)
    try:
        if not engines.ready(engine):
            raise RuntimeError(f"engine to profile failed to start (log: {log}):\n{logs.tail(log, 20)}")
        cmd = [
            py_spy(),
            "record",
            "--pid",
            str(engine.pid),
            "--subprocesses",
            "--nonblocking",
            "--format",
            "raw",
            "--nolineno",
            "--rate",
            str(rate),
            "--duration",
            str(int(seconds)),
            "--output",
            str(out_raw),
        ]
        engines.go(engine)
        time.sleep(delay)  # past the first prefill wave: steady state
        recorder = procs.run(cmd, timeout=seconds + 60)
        result = engines.result_of(engine) or {"error": "the engine gave no result"}
    finally:
        engines.stop(engine)
    if recorder.returncode != 0 or not Path(out_raw).exists():
        return {
            "error": f"py-spy failed (exit {recorder.returncode}): {recorder.stderr.strip()[-500:]}",
            "command": cmd,
        }
    return {
        "command": cmd,
        "engine": result,
        "busy": busy(out_raw, seconds, rate),
        "summary": summarize(out_raw),
        "engine_step": under(out_raw, "EngineCore.step"),
        # a worker process, where vLLM runs the model outside the engine core (the CPU build does)
        "worker": summarize(out_raw, process="VLLM::Worker"),
        # the process that feeds the engine core (LLM.generate: requests in, outputs out)
        "front": summarize(out_raw, process="tinyllm_vllm.bench.engine_main"),
    }
