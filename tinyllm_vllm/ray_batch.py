"""``generate --input ... --ray``: the same JSONL batch on Ray Data LLM, for work beyond one machine.

    tinyllm-vllm generate --input rows.jsonl --output out.jsonl --ray                      # a Ray of its own
    tinyllm-vllm generate --input rows.jsonl --output out.jsonl --ray --ray-address auto   # a running cluster
    tinyllm-vllm generate --input rows.jsonl --output out.jsonl --ray --print-config       # no Ray needed

Ray Data LLM runs next to either build of vLLM, the CPU one too (the ``ray-data`` extra); the tests run it.

The rows are read and checked as the local batch reads them (``batch.read_rows``), and each becomes the
prompt the local batch would give its engine, as text, with its own sampling fields. Ray Data LLM's vLLM
stage sends that text to vLLM, which adds the tokenizer's prefix (``[gMASK]sop``) itself: a chat's text
from the chat template is passed without it, so the prompt's tokens are the local batch's tokens.

``processor_config`` is the Ray Data LLM processor (``vLLMEngineProcessorConfig``'s fields): N engine
replicas (the kit's plan for one GPU, each on 1/N of it, or ``--engines N`` anywhere on the cluster), the
engine arguments of ``Settings``, the plugin and the compile cache reaching every worker through the
runtime environment. Making it imports no Ray, so it is checked on any machine.

Results stream back to the driver as Ray finishes them and are appended to a part file (flushed, synced
every second), so a stopped run keeps what it made and the same command resumes; the output is written in
input order, in the local batch's row format. Ray Data reports no finish reason: ``length`` is written
when a row made its ``max_tokens``, ``stop`` otherwise.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinyllm_vllm.batch import SAMPLING_FIELDS, SYNC_S, BatchJob, done_indices, read_rows, result_row, write_output
from tinyllm_vllm.errors import TinyllmError
from tinyllm_vllm.model.plugin import OWN_DP_PORT
from tinyllm_vllm.runtime import procs, startup
from tinyllm_vllm.runtime.cluster import MARK
from tinyllm_vllm.runtime.plan import plan, share
from tinyllm_vllm.settings import Settings

BATCH_SIZE = 256  # rows Ray Data hands an engine at a time; the engine keeps several such batches in flight
BATCHES_IN_FLIGHT = 8  # per engine: with 256 rows each, 2048 requests, twice what one engine runs in a step


def processor_config(model: str | Path, settings: Settings, engines: str = "auto") -> dict[str, Any]:
    """The keyword arguments of ``ray.data.llm.vLLMEngineProcessorConfig`` for TinyLLM: ``engines`` replicas of
    the engine (``auto``: the kit's offline plan for one GPU), each on 1/N of a GPU and of the memory budget;
    the kit tokenizes nothing in Ray (the prompts are text) and detokenizes in the engine."""
    gpu = plan(settings, engines, offline=True)
    n = gpu.engines
    engine = share(settings, n).engine_options()
    env = startup.cache_env(settings.home)  # what one engine compiled, every Ray worker on this host reuses
    env[OWN_DP_PORT] = "1"  # engines starting together would race for one port (plugin.own_dp_master_port)
    bundle: dict[str, float] = {"CPU": 1}
    if settings.device == "cuda":
        bundle["GPU"] = round(1 / n, 4)
        env["VLLM_RAY_PER_WORKER_GPUS"] = str(bundle["GPU"])  # vLLM's Ray worker asks for 1 GPU otherwise
    return {
        "model_source": str(Path(model).resolve()),
        "engine_kwargs": engine,
        "concurrency": n,
        "batch_size": BATCH_SIZE,
        "max_concurrent_batches": BATCHES_IN_FLIGHT,
        "placement_group_config": {"bundles": [bundle]},
        "runtime_env": {"env_vars": env},
        # the prompts arrive as the text the local batch tokenizes; no chat template or tokenizer stage in Ray
        "chat_template_stage": False,
        "tokenize_stage": False,
        "detokenize_stage": False,
    }


def prompt_texts(tokenizer: Any, rows: list[dict], raw: bool) -> list[str]:
    """Each row's prompt as the text vLLM turns into the local batch's tokens (``batch.prompt_ids``): a raw
    prompt as it is; a chat through the chat template, less the prefix vLLM's tokenizer adds again."""
    if raw:
        return [r["prompt"] for r in rows]
    prefix = tokenizer.decode(tokenizer("")["input_ids"])  # what add_special_tokens puts first: [gMASK]sop
    chats = [r.get("messages") or [{"role": "user", "content": r["prompt"]}] for r in rows]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    return [t.removeprefix(prefix) for t in texts]


def ray_rows(tokenizer: Any, job: BatchJob, rows: list[dict], todo: list[int]) -> list[dict]:
    """The dataset's rows: ``index``, the prompt text and the row's sampling parameters over the command's."""
    defaults = {"max_tokens": job.max_tokens, "temperature": job.temperature, "top_p": job.top_p, "seed": job.seed}
    texts = prompt_texts(tokenizer, [rows[i] for i in todo], job.raw)
    out = []
    for i, text in zip(todo, texts, strict=True):
        own = {k: rows[i][k] for k in SAMPLING_FIELDS if rows[i].get(k) is not None}
        params = {k: v for k, v in (defaults | own).items() if v is not None}
        params["skip_special_tokens"] = True
        out.append({"index": i, "prompt": text, "sampling_params": params})
    return out


def check_ray() -> None:
    """Ray Data LLM imports next to either vLLM build (the CPU one too); say what to install where it does not."""
    try:
        import ray.data.llm  # noqa: F401
    except ImportError as e:
        raise TinyllmError(f"--ray needs Ray Data LLM: pip install 'tinyllm-vllm[ray-data]' ({e})") from None


def run_ray_batch(
    model: Path,
    job: BatchJob,
    settings: Settings,
    address: str | None = None,
    echo: Callable[[str], Any] = print,
) -> dict:
    """The batch on Ray Data LLM: rows not yet done through ``processor_config``'s engines, each result appended
    to a part file as it comes back, the output in input order. Returns rows, engines, tokens and seconds."""
    if job.output is None:
        raise TinyllmError("--input needs --output FILE (results, in input order)")
    check_ray()
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from transformers import AutoTokenizer

    import tinyllm_vllm.model.config  # noqa: F401  (registers model_type tinyllm for the tokenizer)

    t0 = time.time()
    rows = read_rows(job.input)
    done = done_indices(job)
    todo = [i for i in range(len(rows)) if i not in done]
    config = processor_config(model, settings, job.engines)
    summary: dict[str, Any] = {"rows": len(rows), "done_before": len(done), "engines": config["concurrency"]}
    if todo:
        items = ray_rows(AutoTokenizer.from_pretrained(str(model)), job, rows, todo)
        echo(f"{len(todo)} of {len(rows)} rows to generate on Ray Data LLM with {config['concurrency']} engine(s)")
        started = not ray.is_initialized()
        if started:
            # every process of a Ray started here carries the mark, so none outlives the command (stop, below)
            token = os.environ.setdefault(MARK, uuid.uuid4().hex)
            # the plugin reaches Ray's workers through its entry point: the package is installed on every node;
            # "local": a Ray of its own even where `ray start` left /tmp/ray/ray_current_cluster behind
            kw = {} if address else {"include_dashboard": False}  # a Ray of its own: no dashboard processes to start
            ray.init(address=address or "local", log_to_driver=False, **kw)
        # the row steps around the engine are light: a tenth of a CPU each, so they never wait for the CPU an
        # engine holds (on a machine of few cores they would otherwise run only between the engine's batches)
        light = {"num_cpus": 0.1}
        processor = build_processor(
            vLLMEngineProcessorConfig(**config),
            postprocess=_result,
            preprocess_map_kwargs=light,
            postprocess_map_kwargs=light,
        )
        job.parts.mkdir(parents=True, exist_ok=True)
        part = job.parts / f"part-ray-{os.getpid()}.jsonl"
        limits = {x["index"]: x["sampling_params"]["max_tokens"] for x in items}
        tokens, first, synced, last_tenth = 0, None, time.monotonic(), -1
        try:
            with open(part, "a") as f:
                for n, row in enumerate(processor(ray.data.from_items(items)).iter_rows(), 1):
                    first = first or time.time()
                    i = row["index"]
                    finish = "length" if row["tokens"] >= limits[i] else "stop"
                    result = result_row(i, rows[i], row["text"], row["tokens"], finish)
                    f.write(json.dumps(result, ensure_ascii=False) + "\n")
                    f.flush()
                    tokens += row["tokens"]
                    if time.monotonic() - synced >= SYNC_S:
                        os.fsync(f.fileno())
                        synced = time.monotonic()
                    if (len(done) + n) * 10 // len(rows) > last_tenth:
                        last_tenth = (len(done) + n) * 10 // len(rows)
                        echo(f"{len(done) + n}/{len(rows)} rows done after {time.time() - t0:.0f} s")
                os.fsync(f.fileno())
        except BaseException:
            kept = len(done_indices(job))
            echo(f"stopped: {kept} of {len(rows)} rows are kept in {job.parts}; the same command resumes")
            raise
        finally:
            if started:
                ray.shutdown()
                if not address:
                    procs.sweep(MARK, token)
        end = time.time()
        summary |= {"output_tokens": tokens, "generate_s": end - (first or end)}
        summary["whole_tok_s"] = tokens / max(1e-9, end - t0)
    else:
        echo(f"all {len(rows)} rows were done before; writing them in input order")
    write_output(job, len(rows))
    summary["seconds"] = time.time() - t0
    echo(f"wrote {len(rows)} results to {job.output} ({summary['seconds']:.0f} s in all)")
    return summary


def _result(row: dict) -> dict:
    """What the driver keeps of a finished row (Ray carries every column to here)."""
    return {"index": row["index"], "text": row["generated_text"], "tokens": row["num_generated_tokens"]}
