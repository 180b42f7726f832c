"""A large offline batch over N engines sharing the GPU: JSONL in, JSONL out in input order, resumable.

    tinyllm-vllm generate --input prompts.jsonl --output out.jsonl      # --engines auto (1 on a CPU)

Each input line is ``{"prompt": "..."}`` (with ``--raw``: completed as it is) or ``{"messages": [...]}``
(a chat in the training format); a ``"prompt"`` without ``--raw`` is one user turn. A line may carry its
own sampling fields (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``ignore_eos``,
``min_tokens``, ``repetition_penalty``) over the command's; a line of OpenAI's batch input
(``{"custom_id": ..., "body": {"messages": [...], "max_tokens": ...}}``) is read as its body. Other keys
(an ``id``, ``custom_id``) are copied to the output.

The rows to do are dealt to N engine processes (``plan.share``: 1/N of the memory each; on a CPU, cores
of their own, ``plan.cores_env``), started together; N comes from the plan alone. Each engine is kept
full (``feed.keep_full``): a row goes in as soon as another finishes, and every finished row is appended
to the engine's part file at once, flushed, and synced to disk at least once a second, so an interruption
(Ctrl-C, a killed job) loses only rows in flight. Running the same command again skips every row already
written, and the last step writes ``--output`` in input order.
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

from tinyllm_vllm.errors import TinyllmError
from tinyllm_vllm.runtime import logs, procs
from tinyllm_vllm.runtime.feed import Done
from tinyllm_vllm.settings import Settings

# a row's own sampling fields (OpenAI's names) and the types each accepts
SAMPLING_FIELDS: dict[str, tuple[type, ...]] = {
    "max_tokens": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "seed": (int,),
    "ignore_eos": (bool,),
    "min_tokens": (int,),
    "repetition_penalty": (int, float),
}
SYNC_S = 1.0  # a part file is synced to disk at least this often


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
    in_flight: int | None = None  # requests each engine holds (default: twice what it runs in one step)

    @property
    def parts(self) -> Path:
        """Where the engines keep their results until the output is written."""
        return self.output.with_name(self.output.name + ".parts")


@dataclass(frozen=True)
class WorkerSpec(procs.ChildSpec):
    """What one batch engine process does, written as JSON for ``python -m tinyllm_vllm.batch SPEC``."""

    model: str
    input: str
    indices: list[int]
    out: str
    settings: dict[str, Any]
    engine_options: dict[str, Any]
    job: dict[str, Any]
    status: str = ""  # where the engine says when it was ready and when it finished


def read_rows(path: Path) -> list[dict]:
    """The input rows, each brought to ``prompt`` or ``messages`` plus its fields; a malformed line or field is
    named by its line number."""
    if not path.is_file():
        raise TinyllmError(f"--input {path}: no such file")
    rows = []
    for n, line in enumerate(path.read_text().split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TinyllmError(f"{path}:{n}: not JSON ({e.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("body"), dict):  # a line of OpenAI's batch input
            body = {k: v for k, v in row["body"].items() if k != "model"}
            row = {k: v for k, v in row.items() if k not in ("body", "method", "url")} | body
        if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
            raise TinyllmError(f'{path}:{n}: expected an object with "prompt" or "messages"')
        for key, types in SAMPLING_FIELDS.items():
            value = row.get(key)
            if value is not None and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
                expected = " or ".join(t.__name__ for t in types)
                raise TinyllmError(f"{path}:{n}: field {key!r} is {value!r}, expected {expected}")
        if isinstance(row.get("max_tokens"), int) and row["max_tokens"] < 1:
            raise TinyllmError(f"{path}:{n}: field 'max_tokens' must be at least 1")
        rows.append(row)
    return rows


def _part_files(job: BatchJob) -> list[Path]:
    return sorted(job.parts.glob("part-*.jsonl")) if job.parts.is_dir() else []


def done_indices(job: BatchJob) -> dict[int, dict]:
    """Results already written: in the output of an earlier complete run and in the part files."""
    found: dict[int, dict] = {}
    for f in ([job.output] if job.output.is_file() else []) + _part_files(job):
        for line in f.read_text().split("\n"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill (or the empty end): that row is done again
                continue
            found[row["index"]] = row
    return found


def run_batch(model: Path, job: BatchJob, settings: Settings, echo: Callable[[str], Any] = print) -> dict:
    """Generate every input row not yet done with N engines; write the output in input order. Returns what
    ran: rows, engines, output tokens, and seconds in all and while the engines generated."""
    from tinyllm_vllm.runtime.plan import cores_env, plan, share

    if job.output is None:
        raise TinyllmError("--input needs --output FILE (results, in input order)")
    if job.in_flight is not None and job.in_flight < 1:
        raise TinyllmError(f"--in-flight {job.in_flight}: must be at least 1")
    t0 = time.time()
    rows = read_rows(job.input)
    done = done_indices(job)
    todo = [i for i in range(len(rows)) if i not in done]
    summary: dict[str, Any] = {"rows": len(rows), "done_before": len(done), "engines": 0}
    if todo:
        gpu = plan(settings, job.engines, offline=True)
        n = min(gpu.engines, len(todo))  # the plan alone decides, short of more engines than rows
        summary["engines"] = n
        echo(f"{len(todo)} of {len(rows)} rows to generate ({len(done)} done before) with {n} engine(s)")
        job.parts.mkdir(parents=True, exist_ok=True)
        each = share(settings, n)
        workers = []
        try:
            for k in range(n):
                spec = WorkerSpec(
                    model=str(model),
                    input=str(job.input),
                    indices=todo[k::n],
                    out=str(job.parts / f"part-{os.getpid()}-{k}.jsonl"),
                    settings=asdict(each),
                    engine_options=gpu.engine_options,
                    job=asdict(job),
                    status=str(job.parts / f"status-{os.getpid()}-{k}.json"),
                )
                spec_file = spec.write(job.parts / f"spec-{os.getpid()}-{k}.json")
                log = logs.new_log_file(settings.logs, f"batch-engine-{k}")
                cmd = [sys.executable, "-m", "tinyllm_vllm.batch", str(spec_file)]
                env = logs.own_logging_env() | cores_env(settings, k, n)  # on a CPU, each engine on cores of its own
                workers.append((procs.start_group(cmd, log, env), log, Path(spec.status)))
            _follow(job, workers, len(done), len(rows), echo)
        except BaseException:
            for proc, _, _ in workers:
                procs.stop_group(proc, grace=2)
            kept = len(done_indices(job))
            echo(f"stopped: {kept} of {len(rows)} rows are kept in {job.parts}; the same command resumes")
            raise
        summary |= _timing([json.loads(s.read_text()) for _, _, s in workers])
    else:
        echo(f"all {len(rows)} rows were done before; writing them in input order")
    write_output(job, len(rows))
    summary["seconds"] = time.time() - t0
    if "generate_s" in summary:
        echo(
            f"generated {summary['output_tokens']:,} tokens in {summary['generate_s']:.1f} s once the engines were "
            f"ready ({summary['useful_tok_s']:,.0f} tok/s while all generated); {summary['seconds']:.0f} s in all"
        )
    echo(f"wrote {len(rows)} results to {job.output}")
    return summary


def write_output(job: BatchJob, rows: int) -> None:
    """The output in input order, from the rows done (written whole, then renamed); the part files removed."""
    results = done_indices(job)
    tmp = job.output.with_name(job.output.name + ".tmp")
    with open(tmp, "w") as f:
        for i in range(rows):
            f.write(json.dumps(results[i], ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(job.output)
    for part in job.parts.glob("*") if job.parts.is_dir() else []:
        part.unlink()
    if job.parts.is_dir():
        job.parts.rmdir()


def _timing(statuses: list[dict]) -> dict:
    """From the engines' status files: the generating span (first engine ready to last row), and the steady
    rate by the benchmarks' measurement rule (``bench.rule.steady``: tokens made while the rows in flight were
    at least 90% of what the engines run at once together, each row's tokens spread over its time in flight)."""
    from tinyllm_vllm.rule import steady

    first, last = min(s["ready_at"] for s in statuses), max(s["finished_at"] for s in statuses)
    tokens = sum(s["output_tokens"] for s in statuses)
    span = max(1e-9, last - first)
    out = {"output_tokens": tokens, "generate_s": span, "whole_tok_s": tokens / span}
    records = [{"sent": a, "end": b, "tokens": n} for s in statuses for a, b, n in s["records"]]
    rate = steady(records, sum(s["max_num_seqs"] for s in statuses))
    if rate["steady_s"] > 0:
        out |= {"useful_tok_s": rate["steady_tok_s"], "steady_s": rate["steady_s"]}
    else:  # too few rows to keep the engines full: the whole span is all there is
        out |= {"useful_tok_s": tokens / span, "steady_s": 0.0}
    return out


class _Progress:
    """Rows written since it was made, read from the part files' new bytes only (each finished row is one line)."""

    def __init__(self, job: BatchJob) -> None:
        self.job = job
        self.offsets = {f: f.stat().st_size for f in _part_files(job)}  # earlier runs' rows are counted already
        self.lines = 0

    def count(self) -> int:
        for f in _part_files(self.job):
            at = self.offsets.get(f, 0)
            with open(f, "rb") as fh:
                fh.seek(at)
                new = fh.read()
            self.lines += new.count(b"\n")
            self.offsets[f] = at + len(new)
        return self.lines


def _follow(job: BatchJob, workers: list, before: int, total: int, echo: Callable[[str], Any]) -> None:
    """Wait for the engines, saying how far they are about every 10%; a failed engine stops the run."""
    progress = _Progress(job)
    t0, last = time.monotonic(), -1
    while True:
        codes = [p.poll() for p, _, _ in workers]
        for (_, log, _), code in zip(workers, codes, strict=True):
            if code not in (None, 0):
                cause = logs.diagnose(log.read_text(errors="replace")) or f"exit code {code}"
                raise TinyllmError(f"a batch engine failed: {cause} (log: {log})")
        done = before + progress.count()
        if done * 10 // total > last:
            last = done * 10 // total
            echo(f"{done}/{total} rows done after {time.monotonic() - t0:.0f} s")
        if all(code == 0 for code in codes):
            return
        time.sleep(1)


def result_row(index: int, row: dict, text: str, output_tokens: int, finish_reason: str | None) -> dict:
    """One output line: the row's index and its own keys (an ``id``, ``custom_id``), less its prompt and
    sampling fields, then what the engine made."""
    extra = {k: v for k, v in row.items() if k not in ("prompt", "messages", *SAMPLING_FIELDS)}
    return {"index": index, **extra, "text": text, "output_tokens": output_tokens, "finish_reason": finish_reason}


class _PartWriter:
    """Appends each finished row to a part file: flushed at once, synced to disk at least every ``SYNC_S``."""

    def __init__(self, path: Path, rows: list[dict], tokenizer: Any) -> None:
        self.file = open(path, "a")
        self.rows, self.tok = rows, tokenizer
        self.synced = time.monotonic()
        self.output_tokens = 0
        self.records: list[list[float]] = []  # [sent, end, output tokens] of each row, for the steady rate

    def write(self, done: Done) -> None:
        i = done.key
        # the engine does not detokenize (the stops are token ids): the text is decoded once, here
        text = self.tok.decode(done.token_ids, skip_special_tokens=True)
        result = result_row(i, self.rows[i], text, len(done.token_ids), done.finish_reason)
        self.file.write(json.dumps(result, ensure_ascii=False) + "\n")
        self.file.flush()
        self.output_tokens += len(done.token_ids)
        self.records.append([round(done.sent, 3), round(done.end, 3), len(done.token_ids)])
        if time.monotonic() - self.synced >= SYNC_S:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.file.fileno())
        self.synced = time.monotonic()

    def close(self) -> None:
        self.file.flush()
        self.sync()
        self.file.close()


def prompt_ids(tokenizer: Any, rows: list[dict], raw: bool) -> list[list[int]]:
    """Each row's prompt as token ids, as ``LLM.generate`` (raw) and ``LLM.chat`` (the chat template) make them."""
    if raw:
        return tokenizer([r["prompt"] for r in rows])["input_ids"]
    chats = [r.get("messages") or [{"role": "user", "content": r["prompt"]}] for r in rows]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def worker(spec: WorkerSpec) -> None:
    """One engine: its rows through ``feed.keep_full``, each appended to its part file as it finishes."""
    from vllm.inputs import TokensPrompt

    from tinyllm_vllm.runtime import feed, offline

    job = spec.job
    settings = Settings(**spec.settings)
    rows = read_rows(Path(spec.input))
    llm = offline.load_llm(spec.model, settings, echo=None, **spec.engine_options)
    tok = llm.get_tokenizer()
    mine = [rows[i] for i in spec.indices]
    ids = prompt_ids(tok, mine, job["raw"])
    ready_at = time.time()  # the engine is up and its rows are tokens: generating starts now
    defaults = {"max_tokens": job["max_tokens"], "temperature": job["temperature"], "top_p": job["top_p"]}
    defaults["seed"] = job["seed"]

    def requests() -> Any:
        for i, row, prompt in zip(spec.indices, mine, ids, strict=True):
            own = {k: row[k] for k in SAMPLING_FIELDS if row.get(k) is not None}
            params = offline.sampling(**(defaults | own), detokenize=False)
            yield i, TokensPrompt(prompt_token_ids=prompt), params

    writer = _PartWriter(Path(spec.out), rows, tok)
    try:
        feed.keep_full(llm, requests(), writer.write, job["in_flight"])
        writer.close()
        status = {"ready_at": ready_at, "finished_at": time.time(), "rows": len(mine)}
        status |= {"output_tokens": writer.output_tokens, "records": writer.records}
        status["max_num_seqs"] = feed.max_num_seqs(llm)
        Path(spec.status).write_text(json.dumps(status))
    finally:
        offline.close(llm, echo=None)


if __name__ == "__main__":
    worker(WorkerSpec.read(Path(sys.argv[1])))
