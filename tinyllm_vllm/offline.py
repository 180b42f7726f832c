"""Offline generation with ``vllm.LLM``: the original README's ``get_completion``, done right.

Prompts for chat go through the prepared checkpoint's training-format template (``LLM.chat``);
stop ids (eos and the role tokens) come from the prepared generation_config.json, which vLLM applies
to every request. Results are plain rows a notebook can show as a table.

Inside a Jupyter kernel the engine's helper processes are started with ``spawn``: a forked one would
inherit the kernel's ``sys.stdout``, whose ``fileno()`` raises inside vLLM, and so does an engine in the
kernel's own process (vLLM silences NCCL through ``sys.stdout.fileno()``). Elsewhere vLLM chooses (``fork``
where it is safe, which saves the helper a second import of torch and vLLM). Their output goes to a log
file (``logs``); this process shows vLLM's warnings and the kit's own lines.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import logs, startup
from .errors import TinyllmError
from .settings import Settings

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams


@dataclass
class Generation:
    prompt: str
    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str


def load_llm(model_dir: str | Path, settings: Settings | None = None, echo: Any = print, **overrides: Any) -> LLM:
    """Start a vLLM engine (``vllm.LLM``) on a prepared checkpoint (the plugin provides the model).

    ``overrides`` are further ``vllm.LLM`` keyword arguments. The engine's log goes to a file under
    the kit's home (its path is printed), unless ``TINYLLM_VERBOSE=1``.
    """
    settings = settings or Settings.from_env()
    os.environ.update(startup.cache_env(settings.home))
    # in a kernel, tqdm draws the weight-loading bar as a widget in the cell, wherever stderr points
    quiet = {"use_tqdm_on_load": False} if _in_kernel() else {}
    args = settings.engine_options() | quiet | overrides
    if settings.verbose:
        from vllm import LLM

        from .plugin import register_class_here

        register_class_here()
        with logs.environment(_start_method_env()):
            return LLM(str(model_dir), **args)
    log_file = logs.new_log_file(settings.logs, "vllm-engine")
    child_env = logs.send_vllm_log_to(log_file) | _start_method_env()
    if echo:
        echo(f"starting the vLLM engine (log: {log_file})")
    t0 = time.monotonic()
    try:
        with logs.engine_phase(log_file, child_env) as warnings, startup.PhaseEcho(log_file, echo):
            from vllm import LLM

            from .plugin import register_class_here

            register_class_here()
            llm = LLM(str(model_dir), **args)
    except Exception as e:
        cause = logs.diagnose(log_file.read_text(errors="replace")) or f"{type(e).__name__}: {e}"
        raise TinyllmError(
            f"vLLM engine failed to start: {cause}\n--- last lines of {log_file} ---\n{logs.tail(log_file)}"
        ) from e
    seconds = time.monotonic() - t0
    startup.record(settings.home, "offline engine", seconds, log_file)
    if echo:
        echo(f"engine ready after {seconds:.0f} s ({_warned(warnings[0])})")
    return llm


def _in_kernel() -> bool:
    return "ipykernel" in sys.modules


def _start_method_env() -> dict[str, str]:
    """``spawn`` for the engine's helpers inside a Jupyter kernel (see the module's docstring), else nothing;
    set only while the engine starts, so that nothing started later inherits it."""
    return {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"} if _in_kernel() else {}


def in_process(llm: Any) -> bool:
    """Whether the engine runs in this process (no engine-core process of its own)."""
    return type(llm.llm_engine.engine_core).__name__ == "InprocClient"


def _warned(n: int) -> str:
    return f"vLLM logged {n} warning{'s' if n != 1 else ''} while starting; they are in the log" if n else "no warnings"


def close(llm: Any, echo: Any = print) -> None:
    """Stop the engine now, not whenever the garbage collector gets to it: its helper processes end, or (an
    engine in this process) its model and KV cache are freed. ``llm`` cannot generate afterwards."""
    if not hasattr(llm, "llm_engine"):
        return  # closed already
    log_file = logs.current_log_file()
    with logs.engine_phase(log_file) if log_file else contextlib.nullcontext():
        llm.llm_engine.engine_core.shutdown()
        if in_process(llm):
            _free(llm)
    if echo:
        echo("engine stopped")


def _free(llm: Any) -> None:
    """Give back what an in-process engine holds: the model and KV cache are reachable only through the LLM
    object, vLLM's distributed state is per process, and vLLM froze the garbage collector after the start."""
    from vllm.distributed import cleanup_dist_env_and_memory

    del llm.llm_engine
    cleanup_dist_env_and_memory()  # unfreezes and runs the collector, empties the CUDA cache


def sampling(
    max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, **kwargs: Any
) -> SamplingParams:
    """``SamplingParams``: greedy by default; pass temperature/top_p/seed to sample reproducibly."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, **kwargs)


def _rows(prompts: list[str], outputs: list) -> list[Generation]:
    return [
        Generation(
            p, o.outputs[0].text, len(o.prompt_token_ids), len(o.outputs[0].token_ids), str(o.outputs[0].finish_reason)
        )
        for p, o in zip(prompts, outputs, strict=True)
    ]


def complete(llm: Any, prompts: list[str], params: Any = None) -> list[Generation]:
    """Raw completion of each prompt (the tokenizer prepends [gMASK]sop), batched in one call."""
    return _rows(prompts, llm.generate(prompts, params or sampling(), use_tqdm=False))


def chat(llm: Any, questions: list[str], params: Any = None, system: str | None = None) -> list[Generation]:
    """One chat turn per question in TinyLLM's training format, batched in one call.

    ``params`` is one ``SamplingParams`` for all, or a list with one per question."""
    head = [{"role": "system", "content": system}] if system else []
    conversations = [head + [{"role": "user", "content": q}] for q in questions]
    return _rows(questions, llm.chat(conversations, params or sampling(), use_tqdm=False))
