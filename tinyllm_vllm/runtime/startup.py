"""Where an engine's start goes, read from vLLM's own log: one line per phase while it starts, a record after.

vLLM logs each phase of a start with its duration (weights loaded, torch.compile or its cache hit, CUDA
graphs captured, the KV cache set up, the API server up). ``PhaseEcho`` follows a log file while an
engine or server starts and echoes one short line per phase, so a learner sees what the wait is;
``phases`` reads the same lines into numbers, and ``record`` appends them to ``starts.jsonl`` in the
kit's log folder, which ``tinyllm-vllm bench walkthrough`` collects.

Compiled graphs and Triton kernels are cached under the kit's home (``VLLM_CACHE_ROOT`` and
``TRITON_CACHE_DIR``, see ``cache_env``), so a later start of the same configuration loads them instead of
compiling again.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinyllm_vllm.runtime.logs import LOG_TIME, PHASES, TIMELINE


def cache_env(home: Path) -> dict[str, str]:
    """vLLM's compile cache under the kit's home (unless VLLM_CACHE_ROOT is set), and Triton's kernel cache
    beside it (unless TRITON_CACHE_DIR is set; Triton's own default is ``~/.triton``, outside the home): every
    engine, server and replica the kit starts for a configuration reuses what the first one compiled, and a
    fresh home starts from nothing."""
    env = {}
    root = os.environ.get("VLLM_CACHE_ROOT")
    if not root:
        root = env["VLLM_CACHE_ROOT"] = str(Path(home) / "vllm-cache")
    if not os.environ.get("TRITON_CACHE_DIR"):
        env["TRITON_CACHE_DIR"] = str(Path(root) / "triton")
    return env


def _stamp(line: str, year: int) -> float | None:
    m = LOG_TIME.search(line)
    if not m:
        return None
    return time.mktime(time.strptime(f"{year}-{m.group(1)}", "%Y-%m-%d %H:%M:%S"))


def timeline(log_text: str, started: float, ready: float) -> dict[str, float]:
    """Seconds per segment of a start from the wall-clock times of vLLM's log lines, between ``started``
    (the launch) and ``ready``; ``rest_s`` is what follows the last segment found (the caller's own wait)."""
    year = time.localtime(started).tm_year
    lines = log_text.splitlines()
    out: dict[str, float] = {}
    clock, i = started, 0
    for name, pattern in TIMELINE:
        for j in range(i, len(lines)):
            if re.search(pattern, lines[j]) and (at := _stamp(lines[j], year)) is not None:
                # stamps are whole seconds: a segment can read up to 1 s short, never below zero
                out[name] = round(max(0.0, min(at, ready) - clock), 1)
                clock, i = max(clock, min(at, ready)), j
                break
    out["rest_s"] = round(max(0.0, ready - clock), 1)
    return out


def phases(log_text: str) -> dict[str, float | bool]:
    """Seconds per phase of the last start in a log (as vLLM reports them), and whether it compiled."""
    out: dict[str, float | bool] = {}
    for name, pattern, _ in PHASES:
        found = re.findall(pattern, log_text)
        if found and name not in ("compile", "api_server"):
            out[f"{name}_s"] = float(found[-1])
    out["compiled"] = bool(re.search(PHASES[1][1], log_text))
    out["compile_cache_hit"] = "compile_cached_s" in out
    return out


def cold_of(p: dict) -> bool | None:
    """Whether a start compiled from scratch, from its ``phases``; None when its log held no start lines."""
    if "weights_s" not in p:
        return None
    return bool(p.get("compiled")) and not p.get("compile_cache_hit")


class PhaseEcho:
    """Follow ``log_file`` in a thread and ``echo`` one line per phase as vLLM reaches it."""

    def __init__(self, log_file: Path, echo: Callable[[str], Any] | None, prefix: str = "  ") -> None:
        self.log_file, self.echo, self.prefix = Path(log_file), echo, prefix
        self._stop = threading.Event()
        self._seen: set[str] = set()
        self._offset = 0  # every start writes a log file of its own
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PhaseEcho:
        if self.echo:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self._scan()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._scan()

    def _scan(self) -> None:
        if not self.echo or not self.log_file.exists():
            return
        with open(self.log_file, errors="replace") as f:
            f.seek(self._offset)
            text = f.read()
            self._offset = f.tell()
        for name, pattern, line in PHASES:
            if name in self._seen or name == "engine_init" or name == "compile_total" and "compile" not in self._seen:
                continue  # "engine ready" is the caller's own last line
            m = re.search(pattern, text)
            if m:
                self._seen.add(name)
                self.echo(self.prefix + line.format(*m.groups()))


def record(
    home: Path, what: str, seconds: float, log_file: Path | None, ready_at: float | None = None, **extra: Any
) -> dict:
    """Append one start to ``<home>/logs/starts.jsonl`` and return it: ``seconds`` from launch to ready, which
    was now or at ``ready_at`` (a wall-clock time; the log's stamps are placed against it)."""
    text = log_file.read_text(errors="replace") if log_file and log_file.exists() else ""
    now = ready_at or time.time()
    entry = {"what": what, "seconds": round(seconds, 1), "at": now, "log": str(log_file)}
    entry |= extra | {"phases": phases(text), "timeline": timeline(text, now - seconds, now)}
    entry["cold"] = cold_of(entry["phases"])
    log = _starts_file(home)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


def read_starts(home: Path) -> list[dict]:
    """Every start recorded in ``home`` (``record``), oldest first."""
    log = _starts_file(home)
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def expected(home: Path, kind: str, last: int = 3) -> str:
    """What the last ``last`` starts of ``kind`` (``offline engine``, ``server``, ``replica``) took in this home, as
    a few words for the line that announces the next one; empty before the first."""
    took = [r for r in read_starts(home) if r["what"] == kind or r["what"].startswith(kind + " ")][-last:]
    if not took:
        return ""
    lo, hi = min(r["seconds"] for r in took), max(r["seconds"] for r in took)
    span = f"{lo:.0f} s" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f} s"
    return f"the last {'start' if len(took) == 1 else f'{len(took)} starts'} here took {span}"


def _starts_file(home: Path) -> Path:
    return Path(home) / "logs" / "starts.jsonl"
