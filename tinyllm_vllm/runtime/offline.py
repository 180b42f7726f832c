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

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyllm_vllm.errors import TinyllmError
from tinyllm_vllm.runtime import logs, startup
from tinyllm_vllm.settings import Settings

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
    """Start an in-process vLLM engine on a prepared checkpoint (the plugin provides the model).

    ``overrides`` are further ``vllm.LLM`` keyword arguments. The engine's log goes to a file under
    the kit's home (its path is printed), unless ``TINYLLM_VERBOSE=1``.
    """
    settings = settings or Settings.from_env()
    os.environ.update(startup.cache_env(settings.home))
    args = settings.engine_options() | overrides
    if settings.verbose:
        with logs.environment(_start_method_env()):
            return new_llm(model_dir, args)
    log_file = logs.new_log_file(settings.logs, "vllm-engine")
    child_env = logs.send_vllm_log_to(log_file) | _start_method_env()
    if echo:
        took = startup.expected(settings.home, "offline engine")
        echo(f"starting the vLLM engine (log: {log_file}{'; ' + took if took else ''})")
    t0 = time.monotonic()
    try:
        with logs.engine_phase(log_file, child_env) as warnings, startup.PhaseEcho(log_file, echo):
            llm = new_llm(model_dir, args)
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


def new_llm(model_dir: str | Path, args: dict[str, Any]) -> LLM:
    """The kit's one construction of an offline engine: the plugin's class registered in this process, then
    ``vllm.LLM`` with ``args``. ``load_llm`` wraps it for users (settings, log file, start record); the
    benchmark engines and the parity check call it directly (their process is the engine's own)."""
    from vllm import LLM

    from tinyllm_vllm.model.plugin import register_class_here

    register_class_here()
    return LLM(str(model_dir), **args)


def _start_method_env() -> dict[str, str]:
    """``spawn`` for the engine's helpers inside a Jupyter kernel (see the module's docstring), else nothing;
    set only while the engine starts, so that nothing started later inherits it."""
    return {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"} if "ipykernel" in sys.modules else {}


def _warned(n: int) -> str:
    return f"vLLM logged {n} warning{'s' if n != 1 else ''} while starting; they are in the log" if n else "no warnings"


def close(llm: Any, echo: Any = print) -> None:
    """Shut the engine's helper processes down now (not whenever the garbage collector gets to them)."""
    log_file = logs.current_log_file()
    if log_file is None:  # TINYLLM_VERBOSE: vLLM logs as it likes
        llm.llm_engine.engine_core.shutdown()
        return
    with logs.engine_phase(log_file):
        llm.llm_engine.engine_core.shutdown()
    if echo:
        echo("engine stopped")


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
