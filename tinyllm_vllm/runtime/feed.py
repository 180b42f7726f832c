"""Keep one offline engine full: requests go in as others finish, not in waves.

``vllm.LLM.generate`` returns when its last request ends, so a caller that hands it rows in chunks waits
at the end of every chunk for the chunk's longest reply while the engine runs fewer and fewer rows.
``keep_full`` drives the engine itself (vLLM's ``LLMEngine.add_request`` / ``step`` loop, as ``LLM`` does
inside ``generate``): it holds ``in_flight`` requests in the engine (by default twice the rows the
engine runs at once, so a finishing row is replaced in the same step) and hands every finished request
to ``on_finish`` the moment it ends. The kit's batch (``batch``) and its offline benchmark engines
(``bench.engines``) both run on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Done:
    """One finished request: its key, the token ids it generated, why it ended, and when (``time.time()``)
    it was handed to the engine and when it came back."""

    key: Any
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    sent: float
    end: float


def max_num_seqs(llm: Any) -> int:
    """How many requests the engine runs in one step (vLLM's ``max_num_seqs``)."""
    return int(llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)


def keep_full(
    llm: Any,
    requests: Iterable[tuple[Any, Any, Any]],
    on_finish: Callable[[Done], Any],
    in_flight: int | None = None,
    keep_adding: Callable[[int], bool] = lambda added: True,
) -> int:
    """Run ``requests`` (``(key, prompt, SamplingParams)``; a prompt as ``LLM.generate`` takes it) through
    ``llm``'s engine, ``in_flight`` at a time (default ``2 * max_num_seqs``); ``on_finish`` gets each
    :class:`Done` as it ends. New requests stop when ``requests`` is exhausted or ``keep_adding(added)``
    turns false (a timed run); those in flight then finish. Returns how many requests ran."""
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    limit = in_flight or 2 * max_num_seqs(llm)
    source: Iterator = iter(requests)
    pending: dict[str, tuple[Any, float]] = {}
    count, more = 0, True
    try:
        while True:
            while more and len(pending) < limit:
                if not keep_adding(count):
                    more = False
                    break
                item = next(source, None)
                if item is None:
                    more = False
                    break
                key, prompt, params = item
                params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when it ends
                rid = f"r{count}"
                count += 1
                pending[rid] = (key, time.time())
                engine.add_request(rid, prompt, params)
            if not pending:
                return count
            for out in engine.step():
                if not out.finished:
                    continue
                # vLLM may add a suffix of its own to a request id ("r7-1a2b3c4d")
                key, sent = pending.pop(out.request_id.split("-")[0])
                o = out.outputs[0]
                on_finish(
                    Done(
                        key,
                        list(o.token_ids),
                        o.text,
                        str(o.finish_reason),
                        len(out.prompt_token_ids or ()),
                        sent,
                        time.time(),
                    )
                )
    except BaseException:
        if pending:  # an engine that lives on (a notebook's) must not keep running what nobody reads
            engine.abort_request(list(pending))
        raise
