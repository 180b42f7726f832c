"""Build results/gpu/ from the files the GPU runs brought back (``tools/gpu_run.py`` parts, via gpu_bg.sh).

    python3 tools/gpu_results.py DIR...     DIRs holding the parts' files: scaling*.json, router_faults.json,
                                            fronts*.json, multi_gpu*.json, profile*, engine_start.json

Serving throughput is recomputed from the clients' raw records with ``vllm_tools.span`` (first client's start
to last client's end), so runs measured before that fix are counted the same way. Writes the JSONs (raw
records gzipped), ``scaling.json`` with the summary the README quotes, and ``scaling.png``.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

from tinyllm_vllm.bench import profile, report, vllm_tools
from tinyllm_vllm.bench.scaling import summary

RESULTS = Path("results/gpu")


def find(dirs: list[Path], name: str) -> Path | None:
    return next((d / name for d in reversed(dirs) if (d / name).exists()), None)


def recount(result: dict, raw: dict) -> dict:
    """Each level's throughput over the clients' whole span, from its raw records."""
    for label, levels in result["runs"].items():
        for lv in levels:
            records = raw.get(f"{label} @ {lv['concurrency']}")
            if not records:
                continue
            duration, spread = vllm_tools.span(records)
            output = sum(r["total_output_tokens"] for r in records)
            lv |= {
                "duration_s": duration,
                "client_start_spread_s": spread,
                "output_tok_s": output / duration,
                "requests_s": lv["completed"] / duration,
                "raw": f"{lv.get('raw', 'raw')}.gz",
            }
    return result


def load_part(dirs: list[Path], name: str) -> dict | None:
    path = find(dirs, f"{name}.json")
    if path is None:
        return None
    result = json.loads(path.read_text())
    raw_path = find(dirs, f"{name}_raw.json")
    if raw_path:
        raw = json.loads(raw_path.read_text())
        recount(result, raw)
        with gzip.open(RESULTS / f"{name}_raw.json.gz", "wt") as f:
            json.dump(raw, f, ensure_ascii=False)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def main(dirs: list[Path]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    scaling, fronts, multi = (load_part(dirs, n) for n in ("scaling", "fronts", "multi_gpu"))
    for name in ("router_faults.json", "engine_start.json", "profile.raw.txt"):
        if found := find(dirs, name):
            shutil.copyfile(found, RESULTS / name)
    if found := find(dirs, "profile.json"):
        prof = json.loads(found.read_text())
        prof["engine_step"] = profile.under(found.parent / "profile.raw.txt", "EngineCore.step")
        (RESULTS / "profile.json").write_text(json.dumps(prof, indent=2) + "\n")
    if scaling is None:
        return
    scaling["summary"] = summary(scaling)
    if fronts:
        scaling["summary"]["api_servers"] = {
            name: max(lv["output_tok_s"] for lv in levels) for name, levels in fronts["runs"].items()
        }
    if multi:
        best = {k: max(lv["output_tok_s"] for lv in v) for k, v in multi["runs"].items()}
        scaling["summary"] |= {
            "two_gpus": {"machine": multi["machine"], "best_output_tok_s": best},
            "dp2_over_one_gpu": best["DP=2"] / best["1 GPU"],
            "tp2_greedy_equal": multi.get("tp2_greedy_equal"),
            "tp1_greedy_equal": multi.get("tp1_greedy_equal"),
        }
    (RESULTS / "scaling.json").write_text(json.dumps(scaling, indent=2, ensure_ascii=False) + "\n")
    gpu = scaling["machine"]["gpu"]
    panels = [(f"one GPU ({gpu}):\none server, then replicas behind vllm-router", scaling["runs"])]
    if fronts:
        panels.append(("one GPU, one engine:\nvLLM's --api-server-count", fronts["runs"]))
    if multi:
        panels.append(("two GPUs (same kind), one server:\n--data-parallel-size, 4 API servers", multi["runs"]))
    report.plot_serving(panels, RESULTS / "scaling.png", "TinyLLM 92M shape served by vLLM 0.26.0, chat-like requests")
    print(json.dumps(scaling["summary"], indent=2))


if __name__ == "__main__":
    main([Path(d) for d in sys.argv[1:]])
