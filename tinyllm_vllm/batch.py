"""A large offline batch over N engines sharing the GPU: JSONL in, JSONL out in input order, resumable.

    tinyllm-vllm generate --input prompts.jsonl --output out.jsonl      # --engines auto (1 on a CPU)

Each input line is ``{"prompt": "..."}`` (with ``--raw``: completed as it is) or ``{"messages": [...]}``
(a chat in the training format); a ``"prompt"`` without ``--raw`` is one user turn. Other keys (an
``id``) are copied to the output. The remaining rows are dealt to N engine processes (``share``: 1/N of
the memory each, started together); each appends its results chunk by chunk to a part file, flushed to
disk, so an interruption (Ctrl-C, a killed job) loses at most the chunks in flight. Running the same
command again skips every row already done, and the last step writes ``--output`` in input order.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import logs, procs
from .errors import TinyllmError
from .settings import Settings

CHUNK = 256  # rows an engine finishes before it writes them out


@dataclass(frozen=True)
class BatchJob:
    input: Path
    output: Path | None
    engines: str = "auto"
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    raw: bool = False
    chunk: int = CHUNK

    @property
    def parts(self) -> Path:
        """Where the engines keep their results until the output is written."""
        return self.output.with_name(self.output.name + ".parts")


def read_rows(path: Path) -> list[dict]:
    """The input rows; a malformed line is named by its number."""
    if not path.is_file():
        raise TinyllmError(f"--input {path}: no such file")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TinyllmError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
            raise TinyllmError(f'{path}:{n}: expected an object with "prompt" or "messages"')
        rows.append(row)
    return rows


def done_indices(job: BatchJob) -> dict[int, dict]:
    """Results already written: in the output of an earlier complete run and in the part files."""
    found: dict[int, dict] = {}
    files = [job.output] if job.output.is_file() else []
    files += sorted(job.parts.glob("part-*.jsonl")) if job.parts.is_dir() else []
    for f in files:
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: that row is done again
                continue
            found[row["index"]] = row
    return found


def run_batch(model: Path, job: BatchJob, settings: Settings, echo: Callable[[str], Any] = print) -> Path:
    """Generate every input row not yet done with N engines; write the output in input order."""
    from .plan import plan, share

    if job.output is None:
        raise TinyllmError("--input needs --output FILE (results, in input order)")
    rows = read_rows(job.input)
    done = done_indices(job)
    todo = [i for i in range(len(rows)) if i not in done]
    if todo:
        gpu = plan(settings, job.engines)
        n = max(1, min(gpu.engines, len(todo) // job.chunk or 1))
        echo(f"{len(todo)} of {len(rows)} rows to generate ({len(done)} done before) with {n} engine(s)")
        job.parts.mkdir(parents=True, exist_ok=True)
        each = share(settings, n)
        workers = []
        try:
            for k in range(n):
                spec = {
                    "model": str(model),
                    "input": str(job.input),
                    "indices": todo[k::n],
                    "out": str(job.parts / f"part-{os.getpid()}-{k}.jsonl"),
                    "settings": {f: str(v) if isinstance(v, Path) else v for f, v in asdict(each).items()},
                    "engine_options": gpu.engine_options,
                    "job": {f: str(v) if isinstance(v, Path) else v for f, v in asdict(job).items()},
                }
                spec_file = job.parts / f"spec-{k}.json"
                spec_file.write_text(json.dumps(spec))
                log = logs.new_log_file(settings.logs, f"batch-engine-{k}")
                cmd = [sys.executable, "-m", "tinyllm_vllm.batch", str(spec_file)]
                workers.append((procs.start_group(cmd, log, logs.own_logging_env()), log))
            _follow(job, workers, len(rows), echo)
        except BaseException:
            for proc, _ in workers:
                procs.stop_group(proc, grace=2)
            kept = len(done_indices(job))
            echo(f"stopped: {kept} of {len(rows)} rows are kept in {job.parts}; the same command resumes")
            raise
    results = done_indices(job)
    tmp = job.output.with_name(job.output.name + ".tmp")
    with open(tmp, "w") as f:
        for i in range(len(rows)):
            f.write(json.dumps(results[i], ensure_ascii=False) + "\n")
    tmp.replace(job.output)
    for part in job.parts.glob("*") if job.parts.is_dir() else []:
        part.unlink()
    if job.parts.is_dir():
        job.parts.rmdir()
    echo(f"wrote {len(rows)} results to {job.output}")
    return job.output


def _follow(job: BatchJob, workers: list, total: int, echo: Callable[[str], Any]) -> None:
    """Wait for the engines, saying how far they are about every 10%; a failed engine stops the run."""
    t0, last = time.monotonic(), -1
    while True:
        codes = [p.poll() for p, _ in workers]
        for (_, log), code in zip(workers, codes, strict=True):
            if code not in (None, 0):
                cause = logs.diagnose(log.read_text(errors="replace")) or f"exit code {code}"
                raise TinyllmError(f"a batch engine failed: {cause} (log: {log})")
        done = len(done_indices(job))
        if done * 10 // total > last:
            last = done * 10 // total
            echo(f"{done}/{total} rows done after {time.monotonic() - t0:.0f} s")
        if all(code == 0 for code in codes):
            return
        time.sleep(1)


def worker(spec: dict) -> None:
    """One engine: generate its rows chunk by chunk, appending each finished chunk to its part file."""
    from . import offline

    job = spec["job"]
    settings = Settings(**spec["settings"])
    rows = read_rows(Path(spec["input"]))
    llm = offline.load_llm(spec["model"], settings, echo=None, **spec["engine_options"])
    params = offline.sampling(job["max_tokens"], job["temperature"], job["top_p"], job["seed"])
    try:
        with open(spec["out"], "a") as out:
            indices = spec["indices"]
            for start in range(0, len(indices), job["chunk"]):
                chunk = indices[start : start + job["chunk"]]
                for i, r in zip(chunk, _generate(llm, [rows[i] for i in chunk], params, job["raw"]), strict=True):
                    extra = {k: v for k, v in rows[i].items() if k not in ("prompt", "messages")}
                    result = {"index": i, **extra, "text": r.outputs[0].text}
                    result |= {"output_tokens": len(r.outputs[0].token_ids)}
                    result |= {"finish_reason": str(r.outputs[0].finish_reason)}
                    out.write(json.dumps(result, ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())
    finally:
        offline.close(llm, echo=None)


def _generate(llm: Any, rows: list[dict], params: Any, raw: bool) -> list:
    if raw:
        return llm.generate([r["prompt"] for r in rows], params, use_tqdm=False)
    chats = [r.get("messages") or [{"role": "user", "content": r["prompt"]}] for r in rows]
    return llm.chat(chats, params, use_tqdm=False)


if __name__ == "__main__":
    worker(json.loads(Path(sys.argv[1]).read_text()))
