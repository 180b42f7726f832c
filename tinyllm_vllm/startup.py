"""Where an engine's start goes, read from vLLM's own log: one line per phase while it starts, a record after.

vLLM logs each phase of a start with its duration (weights loaded, torch.compile or its cache hit, CUDA
graphs captured, the KV cache set up, the API server up). ``PhaseEcho`` follows a log file while an
engine or server starts and echoes one short line per phase, so a learner sees what the wait is;
``phases`` reads the same lines into numbers, and ``record`` appends them to ``starts.jsonl`` in the
kit's log folder, which ``tinyllm-vllm bench walkthrough`` collects.

Compiled graphs are cached under the kit's home (``VLLM_CACHE_ROOT``, see ``cache_env``), so a later
start of the same configuration loads them instead of compiling again.
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

NUM = r"([\d.]+)"
# (phase, pattern in vLLM's log, what the learner reads); the first match of each phase is echoed
PHASES = [
    ("weights", rf"Model loading took .*? and {NUM} s", "weights loaded in {0} s"),
    (
        "compile",
        r"Dynamo bytecode transform time|Compiling a graph for dynamic shape",
        "compiling the model once; later starts of this configuration reuse the cache",
    ),
    ("compile_cached", rf"Directly load the compiled graph.*?took {NUM} s", "compiled model loaded from the cache"),
    ("compile_total", rf"torch\.compile takes {NUM} s in total", "torch.compile done in {0} s"),
    ("cuda_graphs", rf"Graph capturing finished in {NUM} sec", "CUDA graphs captured in {0} s"),
    ("engine_init", rf"init engine \(profile, create kv cache, warmup model\) took {NUM} sec", "engine ready"),
    ("api_server", r"Starting vLLM API server|Application startup complete", "API server starting"),
]
LOG_TIME = re.compile(r"(\d\d-\d\d \d\d:\d\d:\d\d)")


def cache_env(home: Path) -> dict[str, str]:
    """vLLM's compile cache under the kit's home (unless VLLM_CACHE_ROOT is set): every engine, server and
    replica the kit starts for a configuration reuses what the first one compiled."""
    if os.environ.get("VLLM_CACHE_ROOT"):
        return {}
    return {"VLLM_CACHE_ROOT": str(Path(home) / "vllm-cache")}


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


def record(home: Path, what: str, seconds: float, log_file: Path | None, **extra: Any) -> dict:
    """Append one start to ``<home>/logs/starts.jsonl`` and return it."""
    text = log_file.read_text(errors="replace") if log_file and log_file.exists() else ""
    entry = {"what": what, "seconds": round(seconds, 1), "at": time.time(), "log": str(log_file)}
    entry |= extra | {"phases": phases(text)}
    entry["cold"] = bool(entry["phases"].get("compiled")) and not entry["phases"].get("compile_cache_hit")
    folder = Path(home) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "starts.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry
