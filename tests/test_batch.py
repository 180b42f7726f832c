"""`tinyllm-vllm generate --input`: engines kept full, Ctrl-C and kill keep what was written, the same command
resumes, the output in input order; a bad row is named before any engine starts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyllm_vllm.model.demo import corpus_answers

from helpers import cli, ray_python


def _written(parts) -> list[dict]:
    """The rows the engines have written so far (in a folder of part files, or in the part files given), each
    file in the order its rows finished (a line cut by a kill is skipped)."""
    rows = []
    for f in sorted(parts.glob("part-*.jsonl")) if isinstance(parts, Path) else parts:
        for line in f.read_text().split("\n"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def _start_batch(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tinyllm_vllm.cli", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def _wait_until(p: subprocess.Popen, ready, timeout: float = 300, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert p.poll() is None, p.stderr.read()
        assert time.monotonic() < deadline, "the batch wrote too little in time"
        time.sleep(poll)


@pytest.mark.vllm
def test_generate_a_batch_keeps_engines_full_and_resumes_after_ctrl_c_and_kill(demo_dir, tmp_path):
    """--input/--output: a long row does not hold the rows after it back (the engine is fed as rows finish,
    not in chunks); Ctrl-C keeps what was written; a killed run keeps it too; the command run again does only
    the rest, on another engine count too; the output is in input order and equals the model's greedy
    answers; the row with its own sampling fields got them; nothing is left running."""
    n, long_row, in_flight = 4000, 1, 4
    questions = list(corpus_answers())[:8]
    rows = [{"id": f"q{i}", "prompt": questions[i % len(questions)]} for i in range(n)]
    rows[long_row] |= {"max_tokens": 950, "ignore_eos": True}  # its own sampling fields, over --max-tokens
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    base = ["generate", "--model", str(demo_dir), "--input", str(tmp_path / "in.jsonl")]
    base += ["--output", str(tmp_path / "out.jsonl"), "--max-tokens", "64"]
    slow = ["--in-flight", str(in_flight)]  # the interrupted runs: few rows at a time, so they stop midway
    env = os.environ | {"TINYLLM_HOME": str(tmp_path / "home"), "TINYLLM_KV_CACHE_GB": "0.25"}
    parts = tmp_path / "out.jsonl.parts"

    p = _start_batch([*base, *slow, "--engines", "2"], env)
    try:
        # the second engine (its rows are every other one from index 1) has written twice its in-flight count
        # while its first row, the long one, still runs: rows after it finished first. A loop that waits for a
        # chunk's longest row cannot get here.
        def second_engine_wrote() -> bool:
            files = list(parts.glob("part-*-1.jsonl"))
            return bool(files) and len(files[0].read_text().splitlines()) >= 2 * in_flight

        _wait_until(p, second_engine_wrote, poll=0.02)
        # a part file is in the order its rows finished, so this holds however late the check above ran
        finished = [r["index"] for r in _written([next(parts.glob("part-*-1.jsonl"))])]
        assert long_row not in finished[: 2 * in_flight], finished
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        _kill(p)
    assert p.returncode == 130, err
    assert "the same command resumes" in err, err
    kept = len(_written(parts))
    assert 2 * in_flight <= kept < n and not (tmp_path / "out.jsonl").exists()
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _runs_batch_engine(int(pid), tmp_path)]

    # killed outright (no chance to clean up): the engines go with it, the rows written stay
    p = _start_batch([*base, *slow, "--engines", "1"], env)
    try:
        _wait_until(p, lambda: len(_written(parts)) >= kept + 20)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        err = p.stderr.read()
    finally:
        _kill(p)
    assert f"{n - kept} of {n} rows to generate ({kept} done before) with 1 engine(s)" in err, err
    deadline = time.monotonic() + 30
    while [pid for pid in os.listdir("/proc") if pid.isdigit() and _runs_batch_engine(int(pid), tmp_path)]:
        assert time.monotonic() < deadline, "a batch engine outlived the killed command"
        time.sleep(0.5)
    kept_after_kill = {r["index"] for r in _written(parts)}
    assert len(kept_after_kill) >= kept + 20

    r = cli(*base, "--engines", "1", env=env)  # the engine's default in-flight count: the rest goes quickly
    assert r.returncode == 0, r.stderr[-2000:]
    # a killed command dies only once the kernel schedules it, and on a busy machine its engine may finish every
    # row first: both ends are a correct resume
    left = n - len(kept_after_kill)
    said = f"{left} of {n} rows to generate ({n - left} done before)" if left else f"all {n} rows were done before"
    assert said in r.stderr, r.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == [r["id"] for r in rows] and [o["index"] for o in out] == list(range(n))
    answers = corpus_answers()
    assert [o["text"] for i, o in enumerate(out) if i != long_row] == [
        answers[r["prompt"]] for i, r in enumerate(rows) if i != long_row
    ]
    assert (out[long_row]["output_tokens"], out[long_row]["finish_reason"]) == (950, "length")
    assert "max_tokens" not in out[long_row] and not parts.exists()


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _runs_batch_engine(pid: int, tmp_path) -> bool:
    try:
        cmdline = open(f"/proc/{pid}/cmdline").read()
    except OSError:
        return False
    return "tinyllm_vllm.batch" in cmdline and str(tmp_path) in cmdline


def test_a_batch_row_with_a_bad_field_is_named(tmp_path):
    """A row's own sampling field of the wrong type is named with its file, line and field, before any engine
    starts; a line of OpenAI's batch input is read as its body."""
    from tinyllm_vllm.batch import read_rows

    good = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}
    good["body"] = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    bad = {"prompt": "hi", "max_tokens": "many"}
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    r = cli("generate", "--input", str(path), "--output", str(tmp_path / "out.jsonl"), "--model", "demo")
    assert r.returncode == 1 and f"{path}:2: field 'max_tokens' is 'many', expected int" in r.stderr, r.stderr
    path.write_text(json.dumps(good) + "\n")
    assert read_rows(path) == [{"custom_id": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}]


def test_a_batch_on_ray_data_llm_gives_the_demo_answers_in_order_and_leaves_nothing(demo_dir, tmp_path):
    """``generate --input --ray`` on Ray Data LLM (Ray's own, started here; vLLM's CPU build in its engine actor,
    the plugin loaded through the entry point): the model's greedy answers in input order, the rows' own fields
    kept, a second run finds nothing left to do, and no process of that Ray outlives the command."""
    from tinyllm_vllm.runtime.cluster import MARK
    from tinyllm_vllm.runtime.procs import marked

    questions = list(corpus_answers())[:6]
    rows = [{"id": f"q{i}", "prompt": q} for i, q in enumerate(questions)]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    token = f"test-{os.getpid()}"  # the command marks its Ray with this (it keeps a mark it is given)
    env = os.environ | {"TINYLLM_HOME": str(tmp_path / "home"), "TINYLLM_KV_CACHE_GB": "0.25", MARK: token}
    args = ["generate", "--model", str(demo_dir), "--input", str(tmp_path / "in.jsonl"), "--ray"]
    args += ["--output", str(tmp_path / "out.jsonl"), "--max-tokens", "64", "--engines", "1"]
    r = cli(*args, env=env, python=ray_python())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "6 of 6 rows to generate on Ray Data LLM with 1 engine(s)" in r.stderr, r.stderr[-3000:]
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    answers = corpus_answers()
    assert [o["id"] for o in out] == [r["id"] for r in rows] and [o["index"] for o in out] == list(range(6))
    assert [o["text"] for o in out] == [answers[q] for q in questions]
    assert all(o["finish_reason"] == "stop" and 0 < o["output_tokens"] < 64 for o in out), out
    assert not (tmp_path / "out.jsonl.parts").exists()
    assert not marked(MARK, token), "a process of the batch's Ray outlived the command"
    again = cli(*args, env=env, python=ray_python())
    assert again.returncode == 0 and "all 6 rows were done before" in again.stderr, again.stderr[-2000:]
