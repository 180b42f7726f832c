"""The GPU runs behind results/gpu/, one part per device call (vLLM 0.26.0 carried by ../shared/gpu).

    python3 tools/gpu_run.py walkthrough demo|92m NOTEBOOK...   the notebooks under nbmake -> walkthrough-<model>-*.json
    python3 tools/gpu_run.py bench        vllm bench throughput cross-check, py-spy profile, engine start times
    python3 tools/gpu_run.py scaling      1 server, then 1/2/4 replicas behind vllm-router; faults through the router
    python3 tools/gpu_run.py multi        2 GPUs: DP=2 against one GPU, TP=2 greedy parity against TP=1

Results go to $OUT. The 92M model is a random-weight TinyLLM of the published shape with the real
ChatGLM3 tokenizer (``.gpudata/tokenizer.model``): speed does not depend on the weights' values.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

OUT = Path(os.environ.get("OUT", "/tmp/out"))
HOME = Path("/tmp/tinyllm-home")
DATA = Path(".gpudata")
# GPU_RUN_SMALL=1: every part at a size a CPU finishes in minutes (a dry run of this script before device time)
SMALL = os.environ.get("GPU_RUN_SMALL") == "1"


def sized(gpu: int, small: int) -> int:
    return small if SMALL else gpu


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def model(kind: str) -> Path:
    from tinyllm_vllm.checkpoint import prepare_checkpoint
    from tinyllm_vllm.demo import random_model
    from tinyllm_vllm.sources import ensure_model

    if kind == "demo":
        return ensure_model("demo", HOME)[0]
    return prepare_checkpoint(random_model("/tmp/m92-src", DATA / "tokenizer.model"), "/tmp/m92", source="92m-shaped")


def gpu_names() -> list[str]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return [n.strip() for n in out.stdout.splitlines() if n.strip()]


def walkthrough(kind: str, notebooks: list[str]) -> None:
    import vllm

    path = model(kind)
    executed = OUT / f"nb-{kind}"
    env = os.environ | {
        "TINYLLM_MODEL": str(path),
        "TINYLLM_HOME": str(HOME),
        "TINYLLM_EXECUTED_DIR": str(executed),
        "TINYLLM_RESULTS": f"/tmp/results-{kind}",
        "TINYLLM_REPLICAS": "2",
    }
    junit = Path("/tmp/junit.xml")
    t = time.time()
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--nbmake-timeout=600",
        "-v",
        f"--junitxml={junit}",
        *[f"notebooks/{n}.ipynb" for n in notebooks],
    ]
    r = subprocess.run(cmd, env=env, text=True)
    for result in Path(f"/tmp/results-{kind}").glob("bench*"):  # notebook 04's results, not its workload files
        (OUT / f"bench-{kind}").mkdir(exist_ok=True)
        shutil.copy(result, OUT / f"bench-{kind}" / result.name)
    runs = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name").removesuffix(".ipynb")
        failure = case.find("failure")
        runs[name] = {
            "passed": failure is None and case.find("error") is None,
            "seconds": round(float(case.get("time")), 1),
        }
        if failure is not None:
            runs[name]["failure"] = (failure.get("message") or "")[:2000]
    part = {
        "device": gpu_names()[0],
        "vllm": vllm.__version__,
        "model": kind,
        "command": " ".join(cmd[1:]),
        "runs": runs,
        "wall_s": round(time.time() - t, 1),
        "pytest_exit": r.returncode,
    }
    (OUT / f"walkthrough-{kind}-{'-'.join(n[:2] for n in notebooks)}.json").write_text(json.dumps(part, indent=2))
    say(json.dumps(runs))


def bench() -> None:
    """The vllm bench throughput cross-check, the engine profile and engine start settings, on the 92M model."""
    from tinyllm_vllm.bench import vllm_tools
    from tinyllm_vllm.bench.compare import machine, prepare_workload
    from tinyllm_vllm.bench.workload import ChatLike, Fixed
    from tinyllm_vllm.settings import Settings

    path = model("92m")
    options = Settings.from_env(home=HOME).engine_options()
    # the same workloads as notebook 04 at GPU size (same seeds), so the harness numbers there compare
    chat, _ = prepare_workload(path, ChatLike(requests=sized(1024, 32)), "/tmp/wl")
    fixed, _ = prepare_workload(path, Fixed(requests=sized(1024, 32)), "/tmp/wl")
    result = {"machine": machine(), "engine_args": options}
    if os.environ.get("GPU_RUN_PROFILE_ONLY"):
        return _profile(path, options)
    for name, workload in (("chat-like", chat), ("fixed", fixed))[: 2 if os.environ.get("GPU_RUN_FIXED") else 1]:
        say(f"vllm bench throughput, {name}")
        result[f"vllm_bench_throughput_{name}"] = r = vllm_tools.throughput(path, workload, options)
        say(r.get("printed") or r.get("error", "")[-300:])
    (OUT / "bench_vllm_throughput.json").write_text(json.dumps(result, indent=2))
    _profile(path, options)
    if os.environ.get("GPU_RUN_STARTS") != "1":
        return
    _starts(path, options)


def _profile(path: Path, options: dict) -> None:
    """Where one engine's time goes: py-spy on the engine core at steady state (a long chat-like run)."""
    from tinyllm_vllm.bench import profile
    from tinyllm_vllm.bench.compare import machine, prepare_workload
    from tinyllm_vllm.bench.workload import ChatLike

    say("profile")
    long_run, _ = prepare_workload(path, ChatLike(requests=sized(6144, 400), seed=1), "/tmp/wl-long")
    prof = profile.profile_engine(
        {"model": str(path), "workload": str(long_run), "engine": "plugin", "engine_args": options},
        seconds=sized(8, 3),
        out_raw=OUT / "profile.raw.txt",
    )
    (OUT / "profile.json").write_text(json.dumps({"machine": machine()} | prof, indent=2))
    say(json.dumps(prof.get("summary", prof))[:1500])


def _starts(path: Path, options: dict) -> None:
    from tinyllm_vllm.bench import engines
    from tinyllm_vllm.bench.compare import machine, prepare_workload
    from tinyllm_vllm.bench.workload import ChatLike

    # engine start (warm: notebook 04 compiled this model first) with two settings that may start faster
    small, _ = prepare_workload(path, ChatLike(requests=sized(512, 16), seed=2), "/tmp/wl-small")
    sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    variants = {
        "defaults": {},
        "CUDA graphs for 10 batch sizes": {"compilation_config": {"cudagraph_capture_sizes": sizes}},
        "enforce_eager": {"enforce_eager": True},
    }
    starts = {}
    for name, extra in variants.items():
        say(f"engine start: {name}")
        r = engines.run_engine(
            {
                "model": str(path),
                "workload": str(small),
                "engine": "plugin",
                "engine_args": options | extra,
                "repeats": 2,
            }
        )
        starts[name] = {
            "engine_args": extra,
            "engine_start_s": r.get("engine_start_s"),
            "useful_tok_s": r.get("useful_tok_s"),
            "error": r.get("error"),
        }
        say(json.dumps(starts[name]))
    (OUT / "engine_start.json").write_text(
        json.dumps({"machine": machine(), "workload": small.name, "starts": starts}, indent=2)
    )


def scaling() -> None:
    from tinyllm_vllm import faults
    from tinyllm_vllm.bench.compare import prepare_workload
    from tinyllm_vllm.bench.scaling import replicas_scaling, summary
    from tinyllm_vllm.bench.workload import ChatLike
    from tinyllm_vllm.deploy import Replicas
    from tinyllm_vllm.settings import Settings

    path = model("92m")
    settings = Settings.from_env(home=HOME, gpu_util=0.8)
    workload, description = prepare_workload(path, ChatLike(requests=sized(1024, 32), seed=3), "/tmp/wl-serve")
    counts, levels_ = ([1, 2], [8]) if SMALL else ([1, 2, 4], [256, 1024])
    if os.environ.get("GPU_RUN_COUNTS"):  # a shorter run: GPU_RUN_COUNTS=1,2 GPU_RUN_LEVELS=512
        counts = [int(n) for n in os.environ["GPU_RUN_COUNTS"].split(",")]
        levels_ = [int(n) for n in os.environ["GPU_RUN_LEVELS"].split(",")]
    result = replicas_scaling(path, settings, workload, counts=counts, concurrencies=levels_, progress=say)
    result["workload"] = description
    result["summary"] = summary(result)
    say(json.dumps(result["summary"]))
    (OUT / "scaling.json").write_text(json.dumps(result, indent=2))
    if not os.environ.get("GPU_RUN_FAULTS"):
        return
    say("faults through the router")
    with Replicas(path, 2, settings=settings, echo=say) as fleet:
        found = {
            "clients_hang_up": faults.clients_hang_up(fleet, n=64, max_tokens=500),
            "replica_killed": faults.replica_killed_under_load(fleet, n=512, max_tokens=128),
        }
    say(json.dumps(found))
    (OUT / "router_faults.json").write_text(json.dumps(found, indent=2))


def multi() -> None:
    """Two GPUs: vLLM's data parallelism against one GPU, and tensor-parallel greedy parity."""
    from tinyllm_vllm.bench.compare import machine, prepare_workload
    from tinyllm_vllm.bench.scaling import levels
    from tinyllm_vllm.bench.workload import ChatLike
    from tinyllm_vllm.server import VLLMServer
    from tinyllm_vllm.settings import Settings

    path = model("92m")
    settings = Settings.from_env(home=HOME, gpu_util=0.8)
    workload, description = prepare_workload(path, ChatLike(requests=sized(1024, 32), seed=3), "/tmp/wl-serve")
    runs = {}
    for name, args in (("1 GPU", []), ("DP=2", ["--data-parallel-size", "2"])):
        with VLLMServer(path, args, settings=settings, echo=say) as server:
            runs[name] = levels(
                server.url, server.served_model_name, path, workload, [sized(256, 8), sized(1024, 16)], say, name
            )
    best = {k: max(lv["output_tok_s"] for lv in v if "output_tok_s" in lv) for k, v in runs.items()}
    parity = {}
    for tp in (2,):  # TP=1 is the plugin's parity run (equal to the goldens on every prompt in fp32)
        say(f"parity TP={tp}")
        out = Path(f"/tmp/parity-tp{tp}.json")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tinyllm_vllm.parity",
                ".gpuref/reference_tinyllm",
                "--dtype",
                "float32",
                "--tensor-parallel-size",
                str(tp),
                "--json",
                str(out),
            ],
            check=True,
        )
        parity[f"tp{tp}"] = json.loads(out.read_text())[0]
    prompts = [p["tokens_equal"] == p["tokens_total"] for p in parity["tp2"]["prompts"]]  # equal to the goldens
    result = {
        "machine": machine(),
        "workload": description,
        "runs": runs,
        "best_output_tok_s": best,
        "dp2_over_one_gpu": best["DP=2"] / best["1 GPU"],
        "parity": parity,
        "tp2_greedy_equal": f"{sum(prompts)}/{len(prompts)}",
    }
    say(json.dumps({k: result[k] for k in ("best_output_tok_s", "dp2_over_one_gpu", "tp2_greedy_equal")}))
    (OUT / "multi_gpu.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    say(f"GPUs: {gpu_names()}")
    part = sys.argv[1]
    if part == "walkthrough":
        walkthrough(sys.argv[2], sys.argv[3:])
    else:
        {"bench": bench, "scaling": scaling, "multi": multi}[part]()
