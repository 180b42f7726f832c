"""The measurement rule every throughput the kit reports follows (the benchmarks and the batch), in one place.

A throughput is a steady state, not one wave of requests whose longest replies set the clock:

* a timed run lasts at least ``min_seconds`` and holds at least ``min_factor`` times its in-flight count of
  requests (new requests keep coming until both hold; then the ones in flight finish);
* it reports the whole-run rate (every token over first send to last end) and the steady-state rate:
  tokens made in the window where the requests in flight were at least ``steady_share`` of the target
  (a request's tokens are spread evenly over its time in flight);
* warm-up runs on other requests than the timed ones (vLLM's prefix cache would serve repeats);
* a headline figure is the median of ``repeats`` runs, given with its min and max.

``steady`` works on request records (``sent``, ``end``, ``tokens`` and, where known, ``first``): the
offline engines' (``feed.keep_full``) and the serving load's (``load``) alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    min_seconds: float = 20.0
    min_factor: int = 8
    repeats: int = 3
    steady_share: float = 0.9

    def keep_adding(self, t0: float, in_flight: int, clock: Any) -> Any:
        """``feed.keep_full``'s ``keep_adding``: true until the run has lasted ``min_seconds`` and sent
        ``min_factor * in_flight`` requests."""
        need = self.min_factor * in_flight
        return lambda added: added < need or clock() - t0 < self.min_seconds

    def requests(self, in_flight: int) -> int:
        return self.min_factor * in_flight

    def describe(self) -> dict:
        return asdict(self) | {
            "warm_up": "other requests than the timed ones (another seed), run first on every engine",
            "steady_state": f"tokens in the window where requests in flight >= {self.steady_share:.0%} of the "
            "target, each request's tokens spread evenly over its time in flight",
            "headline": f"median of {self.repeats} runs, with [min, max]",
        }


def steady(records: Sequence[dict], target: int, share: float = 0.9) -> dict:
    """Whole-run and steady-state output rates of one timed run from its request records."""
    if not records:
        return {"requests": 0, "seconds": 0.0, "tok_s": 0.0, "steady_tok_s": 0.0, "steady_s": 0.0}
    t0 = min(r["sent"] for r in records)
    t1 = max(r["end"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    events = sorted([(r["sent"], 1) for r in records] + [(r["end"], -1) for r in records])
    level, lo, hi = 0, None, None
    need = share * target
    for t, step in events:
        level += step
        if level >= need:
            lo = t if lo is None else lo
            hi = None
        elif lo is not None and hi is None:
            hi = t
    if lo is None:  # never that many in flight: no steady state
        window = (t0, t0)
    else:
        window = (lo, hi if hi is not None else t1)
    made = 0.0
    for r in records:
        a, b = r.get("first") or r["sent"], r["end"]
        if b <= a:
            made += r["tokens"] if window[0] <= b <= window[1] else 0
            continue
        overlap = max(0.0, min(b, window[1]) - max(a, window[0]))
        made += r["tokens"] * overlap / (b - a)
    span = window[1] - window[0]
    return {
        "requests": len(records),
        "seconds": t1 - t0,
        "output_tokens": tokens,
        "tok_s": tokens / (t1 - t0) if t1 > t0 else 0.0,
        "steady_tok_s": made / span if span > 0 else 0.0,
        "steady_s": span,
        "steady_share_of_run": span / (t1 - t0) if t1 > t0 else 0.0,
    }


def median_spread(values: Sequence[float]) -> dict:
    """The headline form of repeated runs: median and [min, max]."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"median": None, "spread": None}
    return {"median": statistics.median(xs), "spread": [min(xs), max(xs)]}


def headline(runs: Sequence[dict], key: str = "steady_tok_s") -> dict:
    """``useful_tok_s`` (median of ``key`` over the runs), its ``spread``, and the runs' shortest ``seconds``
    and fewest ``requests`` (what the rule is checked against)."""
    ms = median_spread([r[key] for r in runs])
    return {
        "useful_tok_s": ms["median"],
        "spread": ms["spread"],
        "seconds": min(r["seconds"] for r in runs),
        "requests": min(r["requests"] for r in runs),
        "repeats": len(runs),
    }
