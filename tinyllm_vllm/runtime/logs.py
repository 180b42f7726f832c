"""vLLM's log, the kit's way: the whole log goes to a file whose path is printed; the console (a
notebook cell, a terminal's stderr) shows vLLM's warnings and errors from this process and the
kit's own lines. ``TINYLLM_VERBOSE=1`` leaves vLLM's logging as vLLM sets it up.

An in-process engine (``vllm.LLM``) starts helper processes (engine core, workers) that inherit this
process's file descriptors 1 and 2, which a Jupyter kernel forwards into the cell. While they start,
``engine_phase`` points those descriptors at the log file, so the engine's own output (its log,
progress bars, library warnings) lands there instead, and counts the warnings of the start-up for a
one-line summary; after it, vLLM's warnings show as they come.
"""

from __future__ import annotations

import json
import logging.config
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FORMAT = "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"


def new_log_file(directory: Path, kind: str) -> Path:
    """A fresh log file name under ``directory``: ``<kind>-<date>-<time>-<pid>.log``."""
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def _config(log_file: Path, console: bool) -> dict:
    handlers = {
        "file": {"class": "logging.FileHandler", "filename": str(log_file), "formatter": "vllm", "level": "DEBUG"}
    }
    if console:
        handlers["console"] = {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stderr",
            "formatter": "vllm",
            "level": "WARNING",
        }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"vllm": {"format": FORMAT, "datefmt": "%m-%d %H:%M:%S"}},
        "handlers": handlers,
        "loggers": {"vllm": {"handlers": list(handlers), "level": "INFO", "propagate": False}},
    }


LOGGING_VARS = ("VLLM_LOGGING_CONFIG_PATH", "VLLM_CONFIGURE_LOGGING")


def own_logging_env() -> dict[str, str]:
    """This process's environment without a vLLM logging setup meant for another process's log file:
    what a child that keeps its own log (a server writing to its own file) starts with."""
    return {k: v for k, v in os.environ.items() if k not in LOGGING_VARS}


def send_vllm_log_to(log_file: Path) -> dict[str, str]:
    """vLLM's logger: everything to ``log_file``; warnings and errors of this process also to stderr.

    Returns the environment variables that give an engine's helper processes the same setup (file only);
    ``engine_phase`` sets them only while it starts or stops them, so nothing started later inherits them."""
    child = log_file.with_suffix(".logging.json")
    child.write_text(json.dumps(_config(log_file, console=False)))
    import vllm.logger  # noqa: F401  vLLM configures its logger when first imported; ours goes on top

    logging.config.dictConfig(_config(log_file, console=True))
    return {"VLLM_LOGGING_CONFIG_PATH": str(child), "VLLM_CONFIGURE_LOGGING": "1"}


def current_log_file() -> Path | None:
    """The file ``send_vllm_log_to`` points vLLM's log at in this process, if it did."""
    files = [h for h in logging.getLogger("vllm").handlers if isinstance(h, logging.FileHandler)]
    return Path(files[0].baseFilename) if files else None


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` in this process's environment for the block only: what starts inside inherits it, nothing after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def engine_phase(log_file: Path, env: dict[str, str] | None = None) -> Iterator[list[int]]:
    """Start or stop an in-process engine quietly: file descriptors 1 and 2 point at ``log_file`` for the
    processes started inside the block, which also get ``env`` (their logging setup; removed again after
    the block), and this process shows only errors meanwhile. The list it yields gets the number of
    warnings vLLM logged during the block, for a one-line summary."""
    console = [
        h
        for h in logging.getLogger("vllm").handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    levels = [h.level for h in console]
    before = _count_warnings(log_file)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    target = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    warnings = [0]
    try:
        for h in console:
            h.setLevel(logging.ERROR)
        os.dup2(target, 1)
        os.dup2(target, 2)
        with environment(env or {}):
            yield warnings
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)
        for h, level in zip(console, levels, strict=True):
            h.setLevel(level)
        warnings[0] = _count_warnings(log_file) - before


def _count_warnings(log_file: Path) -> int:
    if not log_file.exists():
        return 0
    return sum(line.startswith("WARNING") for line in log_file.read_text(errors="replace").splitlines())


# --- the lines of vLLM's log the kit reads, in one place: a start's phases (echoed and timed, ``startup``),
# the stamps of its timeline (``startup.timeline``), and the causes of a failed start (``diagnose``) -----------

NUM = r"([\d.]+)"
# (phase, pattern in vLLM's log, what the learner reads); the first match of each phase is echoed
PHASES = [
    ("weights", rf"(?:Model loading took .*? and|Loading weights took) {NUM} s", "weights loaded in {0} s"),
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
# The start as a timeline: each segment ends at the first log line matching its pattern (vLLM stamps every
# line to the second), so the segments add up to the whole wait, the parts vLLM does not time included.
TIMELINE = [
    ("process_s", r"Initializing a V1 LLM engine"),  # Python, vLLM imports, config; the API server's too
    (
        "cuda_init_s",
        r"Starting to load model|Loading model from scratch",
    ),  # the worker process, CUDA context, torch.distributed
    ("weights_s", r"Model loading took|Loading weights took"),
    ("compile_s", r"torch\.compile takes|Directly load the compiled graph|Available KV cache memory"),
    ("memory_kv_s", r"GPU KV cache size|CPU KV cache size|Available KV cache memory"),
    ("cuda_graphs_s", r"Graph capturing finished|init engine \(profile"),
    ("warmup_s", r"init engine \(profile"),
    ("api_server_s", r"Application startup complete"),
]

CAUSES = [  # (pattern in the log, headline); the first that matches wins
    (r"address already in use", "port {port} is already in use: pick another port, or stop what listens there"),
    (
        r"CUDA out of memory|OutOfMemoryError|No available memory for the cache blocks|"
        r"less than desired (?:GPU|CPU) memory utilization|Insufficient memory",
        "not enough memory: lower TINYLLM_GPU_UTIL / TINYLLM_KV_CACHE_GB or --max-model-len, or free the device",
    ),
    (r"ConfigError: (.+)", "unsupported config: {0}"),
    (r"CheckpointError: (.+)", "bad checkpoint: {0}"),
    (
        r"model type `(\w+)` but Transformers does not recognize"
        r"|architectures? \[?'?(\w+)'?\]? (?:are|is) not supported",
        "vLLM does not know the model {0}: the tinyllm plugin is not installed in this Python (pip install -e .), "
        "or VLLM_PLUGINS excludes it",
    ),
    (
        r"Should have a `model_type` key in its config.json",
        "not a model directory (its config.json has no model_type): prepare one with `tinyllm-vllm prepare`",
    ),
    (r"Value error, (.+?)(?: \[type=|$)", "{0}"),
    (r"^\s*([\w.]+(?:Error|Exception): .+)$", "{0}"),
]


def diagnose(log_text: str, port: int | None = None) -> str | None:
    """The most likely cause of a failed start, as a one-line headline, or None if nothing matched."""
    for pattern, headline in CAUSES:
        matches = list(re.finditer(pattern, log_text, re.IGNORECASE | re.MULTILINE))
        if matches:
            groups = [g for g in matches[-1].groups() if g] or [""]
            return headline.format(*(g.strip()[:240] for g in groups), port=port)
    return None


def tail(path: Path | None, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ("" if there is none)."""
    if not path or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
