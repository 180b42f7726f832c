"""``tinyllm-vllm bench``: offline engines, vLLM's own tools, serving through replicas, a profile, plots.

tinyllm-vllm bench one-gpu --json results/gpu/one_gpu.json          # the headline: useful tok/s at steady state
tinyllm-vllm bench report results/gpu/one_gpu.json                  # its headline keys, rebuilt from its runs
tinyllm-vllm bench walkthrough --json results/gpu/walkthrough.json  # the notebooks, timed, with every start
tinyllm-vllm bench html results/gpu/notebooks                       # executed notebooks (--executed) as HTML
tinyllm-vllm bench starts --json results/gpu/starts.json            # where an engine's start goes
tinyllm-vllm bench starts --starts serve --json serve_starts.json   # serve alone: first answer, full capacity
tinyllm-vllm bench ray --json ray_serve.json                        # Ray Serve LLM against the kit's replicas
tinyllm-vllm bench offline --workload chat --requests 1024 --json chat.json
tinyllm-vllm bench offline --workload fixed --input-len 128 --output-len 128 --json fixed.json
tinyllm-vllm bench vllm-throughput --workload chat --json vllm_bench.json
tinyllm-vllm bench serve --replicas 1 2 4 --concurrency 64 256 --json scaling.json
tinyllm-vllm bench profile --seconds 10 --json profile.json
tinyllm-vllm bench plot chat.json fixed.json --png bench.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tinyllm_vllm.bench.starts import STARTS
from tinyllm_vllm.bench.workload import ChatLike, Fixed
from tinyllm_vllm.settings import Settings


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "what",
        choices=[
            "one-gpu",
            "walkthrough",
            "starts",
            "ray",
            "offline",
            "vllm-throughput",
            "serve",
            "profile",
            "plot",
            "report",
            "html",
        ],
    )
    p.add_argument(
        "inputs",
        nargs="*",
        help="plot, report: result JSON files; walkthrough: notebook names (default all); html: notebook folders",
    )
    p.add_argument("--serve-requests", type=int, default=16384, help="one-gpu, ray: requests per serving run")
    p.add_argument("--min-seconds", type=float, default=20, help="one-gpu, ray: a timed run lasts at least this long")
    p.add_argument(
        "--min-factor", type=int, default=8, help="one-gpu, ray: and holds this many times its in-flight count"
    )
    p.add_argument("--scan", type=int, nargs="+", default=[2, 4, 8], help="one-gpu: engine counts side by side")
    p.add_argument("--batch-rows", type=int, default=65536, help="one-gpu: rows of the generate --input run")
    p.add_argument(
        "--ray-modes",
        nargs="+",
        choices=["default", "throughput"],
        default=["default", "throughput"],
        help="ray: Ray Serve's own settings and/or Ray's high-throughput mode, measured in this order",
    )
    p.add_argument(
        "--ray-batch-rows", type=int, default=16384, help="ray: rows of the batch on Ray Data LLM and locally (0: none)"
    )
    p.add_argument("--levels", type=int, nargs="+", default=[1024, 2048], help="one-gpu, ray: requests in flight")
    p.add_argument(
        "--starts",
        nargs="+",
        choices=STARTS,
        default=list(STARTS),
        help="starts: which to time: offline engines, one vllm serve, the kit's serve in a fresh and a warm home",
    )
    p.add_argument("--executed", help="walkthrough: keep the executed notebooks (HTML) in this folder")
    p.add_argument("--model", help="prepared dir, hub id, modelscope:ID, demo or auto (default: $TINYLLM_MODEL)")
    p.add_argument("--workload", choices=["chat", "fixed"], default="chat")
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--prompt-range", type=int, nargs=2, default=[16, 384], metavar=("LO", "HI"))
    p.add_argument("--reply-median", type=int, default=100)
    p.add_argument("--reply-max", type=int, default=512)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--engines", nargs="+", default=["plugin", "qwen2", "transformers_static", "transformers_cb"])
    p.add_argument("--repeats", type=int, help="timed runs of each figure (default: one-gpu 3, offline 1)")
    p.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--engine-args", type=json.loads, default={}, help="JSON of extra vllm.LLM arguments")
    p.add_argument(
        "--as-vllm-bench", action="store_true", help="also time the plugin as vllm bench throughput calls it"
    )
    p.add_argument("--engines-per-gpu", type=int, default=1, help="offline: k vLLM engines side by side on the GPU")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--seconds", type=float, default=10, help="profile: how long to record")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png", help="plot: write the figure here")


def distribution(a: argparse.Namespace) -> ChatLike | Fixed:
    if a.workload == "fixed":
        return Fixed(requests=a.requests, input_len=a.input_len, output_len=a.output_len)
    return ChatLike(
        requests=a.requests, prompt_range=tuple(a.prompt_range), reply_median=a.reply_median, reply_max=a.reply_max
    )


def run(a: argparse.Namespace, s: Settings) -> None:
    from tinyllm_vllm.bench import report

    if a.what == "report":  # the headline keys of committed results, rebuilt from their runs; or their tables
        from tinyllm_vllm.bench import onegpu, starts

        for f in a.inputs:
            path = Path(f)
            result = json.loads(path.read_text())
            if result.get("kind") in ("walkthrough", "ray-serve"):
                print((report.walkthrough_tables if result["kind"] == "walkthrough" else report.ray_table)(result))
                continue
            result = (starts.summarized if result.get("kind") == "starts" else onegpu.summarized)(result)
            path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
            print(f"rebuilt {path}")
        return
    if a.what == "html":  # executed notebooks (walkthrough --executed) as pages a browser shows
        from tinyllm_vllm.bench.notebooks import as_html

        for folder in a.inputs:
            for page in as_html(Path(folder)):
                print(f"wrote {page}")
        return
    if a.what == "plot":
        results = [report.load(f) for f in a.inputs]
        print(report.plot_offline([r for r in results if r["kind"] == "offline"], a.png or "bench.png"))
        return
    from tinyllm_vllm.model.sources import ensure_model

    model, note = ensure_model(a.model or s.model, s.home, verbose=s.verbose)
    print(f"[bench] model: {note}", file=sys.stderr)
    out_dir = Path(a.json).parent if a.json else s.home / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    engine_args = s.engine_options() | a.engine_args
    if a.what == "one-gpu":
        from tinyllm_vllm.bench.onegpu import one_gpu
        from tinyllm_vllm.rule import Rule

        def save(partial: dict) -> None:  # a long run keeps what it measured so far
            if a.json:
                Path(a.json).write_text(json.dumps(partial, indent=2, ensure_ascii=False) + "\n")

        rule = Rule(a.min_seconds, a.min_factor, a.repeats or 3)
        result = one_gpu(
            model,
            s,
            out_dir / "one-gpu-work",
            rule,
            distribution(a),
            tuple(a.scan),
            a.batch_rows,
            a.serve_requests,
            tuple(a.levels),
            tuple(a.hf_batch_sizes),
            save=save,
        )
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    elif a.what == "walkthrough":
        from tinyllm_vllm.bench.notebooks import walkthrough

        # the notebooks get the model as the learner names it (they find a built demo model in the home)
        result = walkthrough(a.model or s.model, s.home, a.inputs, Path(a.executed) if a.executed else None)
        print(json.dumps({k: result[k] for k in ("runs", "total_s")}, indent=2))
        for st in result["starts"]:
            print(f"{st['notebook']}: {st['what']} {st['seconds']} s{' (cold)' if st['cold'] else ''}")
    elif a.what == "starts":
        from tinyllm_vllm.bench.starts import starts

        result = starts(model, s, out_dir / "starts-work", a.requests, parts=tuple(a.starts))
    elif a.what == "ray":
        from tinyllm_vllm.bench.ray_serve import ray_vs_router
        from tinyllm_vllm.rule import Rule

        rule = Rule(a.min_seconds, a.min_factor, a.repeats or 3)
        result = ray_vs_router(
            model,
            s,
            out_dir / "ray-work",
            rule,
            distribution(a),
            a.serve_requests,
            tuple(a.levels),
            a.ray_batch_rows,
            tuple(a.ray_modes),
        )
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    elif a.what == "offline":
        from tinyllm_vllm.bench.compare import offline

        result = offline(
            model,
            distribution(a),
            a.engines,
            engine_args,
            out_dir,
            repeats=a.repeats or 1,
            hf_batch_sizes=a.hf_batch_sizes,
            as_vllm_bench=a.as_vllm_bench,
            engines_per_gpu=a.engines_per_gpu,
            settings=s,
        )
        print(report.offline_table(result))
    elif a.what == "vllm-throughput":
        from tinyllm_vllm.bench.compare import machine, prepare_workload
        from tinyllm_vllm.bench.vllm_tools import throughput

        workload, description = prepare_workload(model, distribution(a), out_dir)
        result = {
            "kind": "vllm-throughput",
            "machine": machine(),
            "workload": description,
            "engine_args": engine_args,
        } | throughput(model, workload, engine_args)
        print(json.dumps({k: v for k, v in result.items() if k not in ("command", "machine")}, indent=2))
    elif a.what == "serve":
        from tinyllm_vllm.bench.compare import prepare_workload
        from tinyllm_vllm.bench.scaling import replicas_scaling, summary

        workload, _ = prepare_workload(model, distribution(a), out_dir)
        result = replicas_scaling(model, s, workload, a.replicas, a.concurrency)
        result["summary"] = summary(result)
        for name, levels in result["runs"].items():
            print(f"\n{name}\n{report.serving_table([lv for lv in levels if 'error' not in lv])}")
    else:
        from tinyllm_vllm.bench.compare import prepare_workload
        from tinyllm_vllm.bench.engines import EngineSpec
        from tinyllm_vllm.bench.profile import profile_engine

        workload, _ = prepare_workload(model, distribution(a), out_dir)
        spec = EngineSpec(str(model), str(workload), "plugin", engine_args)
        result = {"kind": "profile"} | profile_engine(spec, a.seconds, out_dir / "profile.raw.txt")
        print(json.dumps(result.get("summary", result), indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
