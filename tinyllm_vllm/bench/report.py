"""Tables and plots of benchmark results. Each engine keeps one colour and one label on every panel."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

LABELS = {
    "plugin": "TinyLLM plugin (vLLM)",
    "qwen2": "vLLM Qwen2 class",
    "transformers_static": "transformers, static batches",
    "transformers_cb": "transformers, continuous batching",
    "vllm_bench_throughput": "vllm bench throughput (plugin)",
}
COLORS = {
    "plugin": "#4c72b0",
    "qwen2": "#8c8c8c",
    "transformers_static": "#dd8452",
    "transformers_cb": "#c44e52",
    "vllm_bench_throughput": "#55a868",
}
SETTING_NAMES = {
    "dtype": "dtype",
    "max_model_len": "context",
    "enforce_eager": "eager",
    "gpu_memory_utilization": "GPU memory",
    "kv_cache_memory_bytes": "KV cache",
    "max_num_seqs": "max seqs",
    "max_num_batched_tokens": "batched tokens",
    "async_scheduling": "async scheduling",
}


def settings_text(engine_args: dict[str, Any]) -> str:
    """Engine options as a short phrase: ``dtype bfloat16, GPU memory 0.8`` (not JSON)."""
    parts = []
    for key, value in engine_args.items():
        if key in ("model_impl", "seed"):
            continue
        if key == "kv_cache_memory_bytes":
            value = f"{value / (1 << 30):g} GiB"
        parts.append(f"{SETTING_NAMES.get(key, key.replace('_', ' '))} {value}")
    return ", ".join(parts) or "vLLM defaults"


def offline_table(result: dict) -> str:
    """Markdown: useful output tok/s and requests/s per engine, and the plugin's ratio to each."""
    rows = [
        f"workload: {result['workload']['description']}",
        f"engine settings: {settings_text(result['engine_args'])}",
        "",
        "| engine | useful output tok/s | requests/s | plugin is |",
        "|---|---:|---:|---:|",
    ]
    useful = result["useful_tok_s"]
    for engine, r in result["engines"].items():
        label = LABELS.get(engine, engine)
        if engine == "transformers_static" and "batch_size" in r:
            label += f" (best batch {r['batch_size']})"
        if "error" in r:
            rows.append(f"| {label} | did not run: {r['error'].splitlines()[-1][:100]} | | |")
            continue
        ratio = useful["plugin"] / r["useful_tok_s"] if "plugin" in useful else float("nan")
        rows.append(f"| {label} | {r['useful_tok_s']:,.0f} | {r['requests_s']:,.1f} | {ratio:.2f}x |")
    return "\n".join(rows)


def serving_table(levels: list[dict]) -> str:
    rows = [
        "| concurrency | clients | output tok/s | req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | failed |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        rows.append(
            f"| {lv['concurrency']} | {lv['clients']} | {lv['output_tok_s']:,.0f} | {lv['requests_s']:,.1f} | "
            f"{lv['ttft_ms_p50'] or 0:.1f} / {lv['ttft_ms_p99'] or 0:.1f} | {lv['tpot_ms_p50'] or 0:.2f} / "
            f"{lv['tpot_ms_p99'] or 0:.2f} | {lv['failed']} |"
        )
    return "\n".join(rows)


def _bars(ax: Any, result: dict, title: str) -> None:
    engines = [e for e in result["useful_tok_s"]]
    values = [result["useful_tok_s"][e] for e in engines]
    ax.bar(
        [LABELS.get(e, e).replace(", ", ",\n").replace(" (", "\n(") for e in engines],
        values,
        color=[COLORS.get(e, "#999999") for e in engines],
    )
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("useful output tokens / s")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelsize=8)


def plot_offline(results: list[dict], png: str | Path, title: str | None = None) -> Path:
    """One panel per results dict (the chat-like workload first), bars coloured by engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r["workload"]["name"] != "chat-like")
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        name = (
            "chat-like workload"
            if r["workload"]["name"] == "chat-like"
            else "fixed workload (best case for static batching)"
        )
        _bars(ax, r, f"{name}\n{r['workload']['requests']} requests")
    machine = results[0]["machine"]
    fig.suptitle(title or machine.get("gpu") or f"CPU ({machine['cpu_count']} cores)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _range(spread: list[float] | None) -> str:
    return f"{spread[0]:,.0f}-{spread[1]:,.0f}" if spread else "-"


def one_gpu_table(result: dict) -> str:
    """``bench one-gpu``'s result as tables: offline (median of the repeats, min-max, the shortest run), the plan
    scan, the batch, and serving through one endpoint per level (with what vLLM's /metrics showed)."""
    off = result["runs"]["offline"]
    hf = result.get("transformers_best_settings") or {}
    names = {
        "single_engine": "one `vllm.LLM`, vLLM's defaults",
        "best": f"**{result['best_offline']['engines']} engines side by side** (`mp`, 1/N of the memory each)",
        "qwen2": "vLLM's own Qwen2 class, one engine",
        "transformers": f"transformers at its best ({hf.get('cache')} cache + compile, batch {hf.get('batch_size')})",
    }
    rows = [
        "| offline | useful tok/s (median) | min-max | runs | shortest run | requests | GPU busy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in names.items():
        r = off.get(key) or {}
        if "useful_tok_s" not in r:
            continue
        busy = [x.get("gpu_busy") for x in r.get("runs", []) if x.get("gpu_busy") is not None]
        rows.append(
            f"| {label} | {r['useful_tok_s']:,.0f} | {_range(r.get('spread'))} | {r.get('repeats', 1)} | "
            f"{r['seconds']:.1f} s | {r['requests']:,} | {_pct(statistics.median(busy) if busy else None)} |"
        )
    rows += [
        "",
        "| plan scan: engines side by side (`mp`) | useful tok/s | runs | shortest run | GPU busy (first run) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for x in result["plan_scan"]:
        if x["engines"] == 1:
            continue  # the single engine's row above
        if x.get("useful_tok_s") is None:
            rows.append(f"| {x['engines']} | failed | - | - | - |")
            continue
        rows.append(
            f"| {x['engines']} | {x['useful_tok_s']:,.0f} | {x.get('repeats', 1)} | {x['seconds']:.1f} s | "
            f"{_pct(x.get('gpu_busy'))} |"
        )
    if result.get("missing"):
        rows += ["", f"Not measured in this run (it was cut short): {', '.join(result['missing'])}."]
    b = result["batch"]
    if b.get("useful_tok_s"):
        rows += [
            "",
            f"`generate --input`: {b['rows']:,} rows on {b['engines']} engines, {b['useful_tok_s']:,.0f} useful tok/s "
            f"at steady state ({b['over_best_offline']:.2f}x the best offline figure), "
            f"{b['seconds']:.1f} s from the first engine ready to the last row, {b['seconds_in_all']:.0f} s in all.",
        ]
    srv = result["runs"].get("serving") or {}
    if not srv.get("levels"):
        return "\n".join(rows)
    rows += [
        "",
        "| through one endpoint | in flight | output tok/s (median, steady) | min-max | shortest run | requests | "
        "TTFT p99 | running / waiting per replica | preemptions |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv, head in zip(srv.get("levels", []), result["serving"]["levels"], strict=True):
        metrics = [m for run in lv["runs"] for m in run.get("metrics", []) if m.get("samples")]
        running = [m["running_mean"] for m in metrics if m.get("running_mean") is not None]
        waiting = [m["waiting_mean"] for m in metrics if m.get("waiting_mean") is not None]
        pre = sum(m.get("preemptions") or 0 for m in metrics)
        load = f"{statistics.fmean(running):,.0f} / {statistics.fmean(waiting):,.0f}" if running and waiting else "-"
        rows.append(
            f"| {srv.get('replicas')} replicas behind vllm-router | {head['concurrency']} | {head['tok_s']:,.0f} | "
            f"{_range(head['spread'])} | {head['seconds']:.1f} s | {head['requests']:,} | "
            f"{head['ttft_ms_p99'] / 1000:.1f} s | {load} | {pre:,.0f} |"
        )
    return "\n".join(rows)


# a start's timeline, in the columns a reader compares; the remaining segments go to "rest"
START_COLUMNS = {
    "process_s": "process and imports",
    "cuda_init_s": "worker, CUDA",
    "compile_s": "compile",
    "warmup_s": "warm-up",
}


def walkthrough_tables(result: dict) -> str:
    """``bench walkthrough``'s result: seconds per notebook, then each start with its timeline."""
    rows = ["| notebook | passed | seconds |", "|---|---|---:|"]
    for name, r in result["runs"].items():
        rows.append(f"| {name} | {'yes' if r['passed'] else 'no'} | {r['seconds']:.1f} |")
    rows.append(f"| all | | {result['total_s']:.1f} |")
    rows += [
        "",
        "| notebook | start | cold | seconds | " + " | ".join(START_COLUMNS.values()) + " | rest |",
        "|---|---|---|---:|" + "---:|" * (len(START_COLUMNS) + 1),
    ]
    for st in result["starts"]:
        t = st.get("timeline", {})
        rest = sum(v for k, v in t.items() if k not in START_COLUMNS)
        cells = " | ".join(f"{t.get(k, 0.0):.1f}" for k in START_COLUMNS)
        cold = {True: "yes", False: "no"}.get(st["cold"], "-")
        rows.append(f"| {st['notebook']} | {st['what']} | {cold} | {st['seconds']:.1f} | {cells} | {rest:.1f} |")
    return "\n".join(rows)


def ray_table(result: dict) -> str:
    """``bench ray``'s result: Ray Serve LLM and the kit's replicas on the same load, and the replica killed."""
    k = result["replica_killed"]
    from tinyllm_vllm.bench.onegpu import level_headline

    rows = [
        f"| endpoint ({result['replicas']} replicas, one GPU) | in flight | steady output tok/s (median) | min-max "
        "| shortest run | TTFT p99 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    runs = result["runs"]
    sides = [(f"Ray Serve LLM, {mode}", side) for mode, side in runs["ray_modes"].items()]
    for label, side in [*sides, ("the kit's replicas behind vllm-router", runs["router"])]:
        for lv in map(level_headline, side["levels"]):
            lo, hi = lv["spread"]
            rows.append(
                f"| {label} | {lv['concurrency']} | {lv['tok_s']:,.0f} | {lo:,.0f}-{hi:,.0f} | {lv['seconds']:.0f} s "
                f"| {lv['ttft_ms_p99'] / 1000:.1f} s |"
            )
    rows += [
        "",
        f"One Ray replica killed {'under load' if k['under_load'] else 'after the load'}: of {k['requests']} "
        f"requests {k['completed']} were answered and {k['failed']} failed ({k['failed_not_begun']} before their "
        f"first token); {k['cut']} streams were cut mid-way. Ray "
        f"Serve had every replica running again after {k['restart_s']} s. The app was ready after "
        + ", ".join(f"{s['start_s']} s ({mode})" for mode, s in runs["ray_modes"].items())
        + ".",
    ]
    two = result.get("two_nodes") or {}
    if two.get("served") is not None:
        rows.append(
            f"On two Ray nodes of this machine: {two['served']} of 32 requests answered; the worker node's raylet "
            f"killed, the app served again from the head after {two.get('recovered_s')} s."
        )
    b = result.get("batch") or {}
    if b.get("useful_tok_s") and b.get("local_useful_tok_s"):
        rows.append(
            f"A batch of {b['rows']:,} rows on {b['engines']} engines: Ray Data LLM {b['useful_tok_s']:,.0f} output "
            f"tok/s while generating, `generate --input` {b['local_useful_tok_s']:,.0f}."
        )
    return "\n".join(rows)


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
