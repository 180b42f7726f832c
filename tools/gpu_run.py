"""The GPU runs behind results/gpu/, one part per device call (vLLM 0.26.0 carried by ../shared/gpu).

    python3 tools/gpu_run.py walkthrough demo|92m NOTEBOOK...   the notebooks under nbmake -> walkthrough-<model>-*.json
    python3 tools/gpu_run.py bench        vllm bench throughput cross-check, then the profile (starts: GPU_RUN_STARTS=1)
    python3 tools/gpu_run.py profile      py-spy on one engine at steady state -> profile.json, profile.raw.txt
    python3 tools/gpu_run.py starts       engine start times with settings that may start faster -> engine_start.json
    python3 tools/gpu_run.py scaling      1 server, then 1/2/3/4 replicas behind vllm-router; faults through the router
    python3 tools/gpu_run.py fronts       one server with one API server, then with --api-server-count 4
    python3 tools/gpu_run.py multi        2 GPUs: DP=2 against one GPU, TP=2 and TP=1 greedy parity on the goldens

Switches: GPU_RUN_FIXED=1 (bench: the fixed workload too), GPU_RUN_STARTS=1 (bench: engine-start settings),
GPU_RUN_COUNTS=1,2 GPU_RUN_LEVELS=512 (scaling: a shorter run), GPU_RUN_FAULTS=1 (scaling: faults through the
router afterwards). GPU_RUN_SMALL=1 shrinks every part to a size a CPU finishes (a dry run).

Results go to $OUT. A part that may outlast one device call (10 minutes) runs detached through
``tools/gpu_bg.sh``, which collects its files in a later call.

The 92M model is a random-weight TinyLLM of the published shape with the real
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
    from tinyllm_vllm.bench.compare import machine

    return machine().get("gpus") or ["no GPU (a dry run)"]


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
    for name, workload in (("chat-like", chat), ("fixed", fixed))[: 2 if os.environ.get("GPU_RUN_FIXED") else 1]:
        say(f"vllm bench throughput, {name}")
        result[f"vllm_bench_throughput_{name}"] = r = vllm_tools.throughput(path, workload, options)
        say(r.get("printed") or r.get("error", "")[-300:])
    (OUT / "bench_vllm_throughput.json").write_text(json.dumps(result, indent=2))
    _profile(path, options)
    if os.environ.get("GPU_RUN_STARTS") != "1":
        return
    _starts(path, options)


def profile() -> None:
    """The py-spy profile alone (the ``bench`` part without its cross-check)."""
    from tinyllm_vllm.settings import Settings

    _profile(model("92m"), Settings.from_env(home=HOME).engine_options())


def starts() -> None:
    """Engine start times with settings that may start faster (the ``bench`` part's GPU_RUN_STARTS)."""
    from tinyllm_vllm.settings import Settings

    _starts(model("92m"), Settings.from_env(home=HOME).engine_options())


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

    # engine start with two settings that may start faster. "defaults" is warm (the profile's engine compiled
    # this model first); a setting that changes what torch.compile builds is started twice: cold, then warm.
    small, _ = prepare_workload(path, ChatLike(requests=sized(512, 16), seed=2), "/tmp/wl-small")
    sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    variants = [
        ("defaults", {}),
        ("CUDA graphs for 10 batch sizes (cold)", {"compilation_config": {"cudagraph_capture_sizes": sizes}}),
        ("CUDA graphs for 10 batch sizes (warm)", {"compilation_config": {"cudagraph_capture_sizes": sizes}}),
        ("enforce_eager", {"enforce_eager": True}),
    ]
    starts = {}
    for name, extra in variants:
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


def _write(name: str, result: dict) -> None:
    """``name``.json without the clients' per-request records, which go to ``name``_raw.json (no inter-token lists)."""
    raw = {}
    for label, lv in result.get("runs", {}).items():
        for level in lv:
            records = level.pop("raw", None)
            if records:
                slim = [{k: v for k, v in r.items() if k != "itls"} for r in records]
                raw[f"{label} @ {level['concurrency']}"] = slim
                level["raw"] = f"{name}_raw.json"
    for level in result.get("warm_up", []):
        level.pop("raw", None)
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    if raw:
        (OUT / f"{name}_raw.json").write_text(json.dumps(raw, ensure_ascii=False))


def scaling() -> None:
    """1 server directly, then the router over 1..4 replicas of one GPU; then faults through the router."""
    import copy

    from tinyllm_vllm import faults
    from tinyllm_vllm.bench.compare import prepare_workload
    from tinyllm_vllm.bench.scaling import replicas_scaling, summary
    from tinyllm_vllm.bench.workload import ChatLike
    from tinyllm_vllm.settings import Settings

    path = model("92m")
    settings = Settings.from_env(home=HOME, gpu_util=0.8)
    workload, description = prepare_workload(path, ChatLike(requests=sized(4096, 32), seed=3), "/tmp/wl-serve")
    counts, levels_ = ([1, 2], [8]) if SMALL else ([1, 2, 3, 4], [512, 2048])
    if os.environ.get("GPU_RUN_COUNTS"):  # a shorter run: GPU_RUN_COUNTS=1,2 GPU_RUN_LEVELS=512
        counts = [int(n) for n in os.environ["GPU_RUN_COUNTS"].split(",")]
        levels_ = [int(n) for n in os.environ["GPU_RUN_LEVELS"].split(",")]

    def save(partial: dict) -> None:
        partial = copy.deepcopy(partial) | {"workload": description}
        partial["summary"] = summary(partial)
        _write("scaling", partial)

    def router_faults(fleet) -> None:
        say("faults through the router")
        found = {
            "replicas": len(fleet.servers),
            "clients_hang_up": faults.clients_hang_up(fleet, n=64, max_tokens=500),
            "replica_killed": faults.replica_killed_under_load(fleet, n=512, max_tokens=128),
        }
        say(json.dumps(found))
        (OUT / "router_faults.json").write_text(json.dumps({"device": gpu_names()[0]} | found, indent=2))

    result = replicas_scaling(
        path,
        settings,
        workload,
        counts=counts,
        concurrencies=levels_,
        progress=say,
        save=save,
        after=router_faults if os.environ.get("GPU_RUN_FAULTS") else None,
    )
    save(result)
    say(json.dumps(summary(result)))


def _servers(name: str, configurations: dict[str, list[str]]) -> dict:
    """One server of the 92M model per configuration (vLLM flags), each warmed up, then ``vllm bench serve``
    at 512 and 2048 in flight; written to ``name``.json after each."""
    from tinyllm_vllm.bench.compare import machine, prepare_workload
    from tinyllm_vllm.bench.scaling import levels
    from tinyllm_vllm.bench.workload import ChatLike
    from tinyllm_vllm.server import VLLMServer
    from tinyllm_vllm.settings import Settings

    path = model("92m")
    settings = Settings.from_env(home=HOME, gpu_util=0.8)
    workload, description = prepare_workload(path, ChatLike(requests=sized(4096, 32), seed=3), "/tmp/wl-serve")
    warm, _ = prepare_workload(path, ChatLike(requests=sized(512, 16), seed=4), "/tmp/wl-warm")
    concurrencies = [sized(512, 8), sized(2048, 16)]
    result = {"machine": machine(), "workload": description, "settings": settings.engine_options(), "runs": {}}
    for label, args in configurations.items():
        with VLLMServer(path, args, settings=settings, echo=say) as server:
            served = server.served_model_name
            # first traffic warms the server up (it is slower); not counted
            levels(server.url, served, path, warm, concurrencies[:1], say, f"{label} warm-up")
            result["runs"][label] = levels(server.url, served, path, workload, concurrencies, say, label)
        result["best_output_tok_s"] = {
            k: max((lv["output_tok_s"] for lv in v if "output_tok_s" in lv), default=0.0)
            for k, v in result["runs"].items()
        }
        _write(name, json.loads(json.dumps(result)))
    return result


def fronts() -> None:
    """One GPU, one engine: vLLM's own front-end scale-out (``--api-server-count 4``) against one API server."""
    _servers("fronts", {"1 API server": [], "4 API servers": ["--api-server-count", "4"]})


def multi() -> None:
    """Two GPUs: vLLM's data parallelism against one GPU, and tensor-parallel greedy parity."""
    # the same front end for both (4 API server processes): one API server, not the engine, bounds a server
    # of this model (fronts.json), and DP=2 would otherwise also get a second one by vLLM's default
    fronts = ["--api-server-count", "4"]
    result = _servers("multi_gpu", {"1 GPU": fronts, "DP=2": ["--data-parallel-size", "2", *fronts]})
    best = result["best_output_tok_s"]
    result["dp2_over_one_gpu"] = best["DP=2"] / best["1 GPU"] if best["1 GPU"] else None
    for tp in (2, 1):
        say(f"parity TP={tp} against the goldens, float32")
        out = Path(f"/tmp/parity-tp{tp}.json")
        cmd = [sys.executable, "-m", "tinyllm_vllm.parity", ".gpuref/reference_tinyllm", "--dtype", "float32"]
        cmd += ["--tensor-parallel-size", str(tp), "--json", str(out)]
        done = subprocess.run(cmd)
        if done.returncode != 0:
            result[f"tp{tp}_greedy_equal"] = f"parity run failed (exit {done.returncode})"
            continue
        parity = json.loads(out.read_text())[0]
        equal = [p["tokens_equal"] == p["tokens_total"] for p in parity["prompts"]]
        result[f"parity_tp{tp}"] = {"command": " ".join(cmd[1:])} | parity
        result[f"tp{tp}_greedy_equal"] = f"{sum(equal)}/{len(equal)}"
        _write("multi_gpu", json.loads(json.dumps(result)))
    keys = ("best_output_tok_s", "dp2_over_one_gpu", "tp2_greedy_equal", "tp1_greedy_equal")
    say(json.dumps({k: result.get(k) for k in keys}))
    _write("multi_gpu", result)


def _py_spy_on_path() -> None:
    """pip --target leaves a wheel's scripts out: take py-spy's executable from the carried wheel."""
    import zipfile

    if shutil.which("py-spy"):
        return
    for wheel in Path(".gpuextra").glob("py_spy-*.whl"):
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith("/scripts/py-spy"))
            Path("/tmp/bin").mkdir(exist_ok=True)
            Path("/tmp/bin/py-spy").write_bytes(z.read(member))
        os.chmod("/tmp/bin/py-spy", 0o755)
        os.environ["PATH"] = "/tmp/bin:" + os.environ["PATH"]
        say(f"py-spy from {wheel.name}")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    say(f"GPUs: {gpu_names()}")
    part = sys.argv[1]
    _py_spy_on_path()
    if part == "walkthrough":
        walkthrough(sys.argv[2], sys.argv[3:])
    else:
        parts = {"bench": bench, "profile": profile, "starts": starts, "scaling": scaling, "fronts": fronts}
        (parts | {"multi": multi})[part]()
