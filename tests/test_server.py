"""vLLM's real OpenAI server as a subprocess: endpoints over HTTP and openai, streaming, readable replies,
the server handle's lifecycle."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyllm_vllm.client import delta_text, http_get, http_post, http_stream
from tinyllm_vllm.errors import ServerError
from tinyllm_vllm.model.demo import corpus_answers
from tinyllm_vllm.model.tokenizer import training_prompt
from tinyllm_vllm.runtime import startup
from tinyllm_vllm.runtime.procs import group_members, wait_group_gone
from tinyllm_vllm.runtime.server import VLLMServer

from helpers import read_jsonl

pytestmark = pytest.mark.vllm

WALKTHROUGH = ["介绍一下中国。", "世界上最大的动物是什么？", "请介绍一下北京", "你好"]


@pytest.fixture(scope="module")
def ref_server(prepared_ref, cpu_settings):
    """A server on the reference checkpoint (the real ChatGLM3 vocabulary, goldens from the original code),
    started from a thread that ends at once: a Jupyter kernel may run code in threads, and the server must
    outlive the thread that started it."""
    import threading

    s = VLLMServer(prepared_ref, settings=cpu_settings, echo=None)
    t = threading.Thread(target=lambda: s.start(wait=False))
    t.start()
    t.join()
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()
    assert not group_members(s.proc.pid)


def test_a_server_started_from_a_thread_outlives_the_thread(ref_server):
    assert ref_server.running
    assert [m["id"] for m in http_get(ref_server.base_url, "/models")["data"]] == ["tinyllm_92m"]


def test_models_endpoint(demo_server):
    body = http_get(demo_server.base_url, "/models")
    assert [m["id"] for m in body["data"]] == ["tinyllm_92m"]


def test_the_start_is_recorded_as_a_timeline(demo_server):
    # every start the kit makes is split into segments from vLLM's own log lines, which add up to the wait
    records = [json.loads(line) for line in (demo_server.settings.logs / "starts.jsonl").read_text().splitlines()]
    (start,) = [r for r in records if r["log"] == str(demo_server.log_file)]
    timeline = start["timeline"]
    assert list(timeline)[:2] == ["process_s", "cuda_init_s"] and timeline["process_s"] > 1, timeline
    assert sum(timeline.values()) == pytest.approx(start["seconds"], abs=1.5), timeline
    assert start["cold"] is False and start["phases"]["weights_s"] >= 0  # eager on the CPU: nothing compiled
    # the next start's announcement tells the learner what to expect, from these records
    took = [r["seconds"] for r in records if r["what"] == "server"][-3:]
    said = startup.expected(demo_server.settings.home, "server")
    assert said.startswith("the last ") and f"{min(took):.0f}" in said, (said, took)
    assert startup.expected(demo_server.settings.home, "no such start") == ""


def test_engine_process_used_the_plugin(demo_server):
    log = demo_server.log_file.read_text()
    assert "Resolved architecture: TinyllmForCausalLM" in log
    lines = [ln for ln in log.splitlines() if "tinyllm_vllm: building TinyllmForCausalLM from the plugin" in ln]
    assert lines and all("APIServer" not in ln for ln in lines)  # built in the engine's worker, not the front end
    assert "TransformersForCausalLM" not in log
    assert "DeprecationWarning" not in log  # started through `vllm serve`, not the deprecated api_server module


def test_completion_over_http_is_the_golden_greedy(ref_server, reference_dir):
    golden = read_jsonl(reference_dir / "golden_greedy.jsonl")[0]  # prompt "你好"
    body = http_post(
        ref_server.base_url,
        "/completions",
        {
            "model": "tinyllm_92m",
            "prompt": golden["prompt"],
            "max_tokens": 24,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    choice = body["choices"][0]
    assert choice["token_ids"] == [s["token"] for s in golden["greedy"]]
    assert body["usage"]["prompt_tokens"] == len(golden["prompt_ids"])
    assert choice["finish_reason"] == "length"


def test_chat_uses_the_training_template(ref_server, prepared_ref):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prepared_ref)
    body = http_post(
        ref_server.base_url,
        "/chat/completions",
        {
            "model": "tinyllm_92m",
            "messages": [{"role": "user", "content": "介绍一下中国。"}],
            "max_tokens": 8,
            "temperature": 0,
            "return_token_ids": True,
        },
    )
    assert body["prompt_token_ids"] == tok(training_prompt("介绍一下中国。"))["input_ids"]
    assert body["choices"][0]["message"]["role"] == "assistant"


def test_chat_replies_of_a_reference_model_have_no_stray_space(ref_server, prepared_ref):
    """The reference model's greedy reply starts with a "▁" token: served text must match decoding the reply alone."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prepared_ref)
    payload = {
        "model": "tinyllm_92m",
        "messages": [{"role": "user", "content": "你好"}],
        "max_tokens": 16,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    body = http_post(ref_server.base_url, "/chat/completions", payload)
    ids = body["choices"][0]["token_ids"]
    text = body["choices"][0]["message"]["content"]
    assert text == tok.decode(ids)
    streamed = "".join(delta_text(e) for e in http_stream(ref_server.base_url, "/chat/completions", payload))
    assert streamed == text


@pytest.mark.parametrize("question", WALKTHROUGH)
def test_the_demo_model_answers_the_walkthrough_questions(demo_server, question):
    """Greedy, streamed and not, on both endpoints: the corpus answer, ending with eos, no stray space."""
    client = demo_server.openai_client()
    messages = [{"role": "user", "content": question}]
    chat = client.chat.completions.create(model="tinyllm_92m", messages=messages, max_tokens=96, temperature=0)
    answer = corpus_answers()[question]
    assert chat.choices[0].message.content == answer
    assert chat.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            model="tinyllm_92m", messages=messages, max_tokens=96, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].choices[0].finish_reason == "stop"
    prompt = training_prompt(question)  # the same prompt through /v1/completions, by raw HTTP
    body = http_post(
        demo_server.base_url,
        "/completions",
        {"model": "tinyllm_92m", "prompt": prompt, "max_tokens": 96, "temperature": 0},
    )
    assert body["choices"][0]["text"] == answer


def test_openai_client_both_endpoints_and_streaming(demo_server):
    client = demo_server.openai_client()
    assert client.models.list().data[0].id == "tinyllm_92m"
    full = client.completions.create(
        model="tinyllm_92m", prompt="你好", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tinyllm_92m",
            prompt="你好",
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert streamed == full.choices[0].text and full.usage.completion_tokens == 12


def test_raw_http_streaming_both_endpoints(demo_server):
    payload = {"model": "tinyllm_92m", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    events = list(http_stream(demo_server.base_url, "/completions", payload | {"prompt": "hello"}))
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    whole = http_post(demo_server.base_url, "/completions", payload | {"prompt": "hello"})
    assert "".join(delta_text(e) for e in events) == whole["choices"][0]["text"]
    events = list(
        http_stream(
            demo_server.base_url, "/chat/completions", payload | {"messages": [{"role": "user", "content": "hello"}]}
        )
    )
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    chat = payload | {"messages": [{"role": "user", "content": "hello"}]}
    whole = http_post(demo_server.base_url, "/chat/completions", chat)["choices"][0]["message"]["content"]
    assert whole and "".join(delta_text(e) for e in events) == whole  # every chunk, not just the first
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"


def test_missing_plugin_fails_loudly_instead_of_falling_back(demo_dir, cpu_settings):
    s = VLLMServer(demo_dir, settings=cpu_settings, env={"VLLM_PLUGINS": ""}, echo=None)
    with pytest.raises(ServerError) as e:
        s.start()
    headline = str(e.value).splitlines()[0]
    assert "vLLM does not know the model tinyllm: the tinyllm plugin is not installed" in headline, headline
    assert "TransformersForCausalLM" not in s.log_file.read_text()
    assert not group_members(s.proc.pid)


CHILD = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as ipykernel does, however the kernel was started
from tinyllm_vllm.runtime.server import VLLMServer
from tinyllm_vllm.settings import Settings
s = VLLMServer(sys.argv[1], settings=Settings(device="cpu", kv_cache_gb=0.5, max_model_len=256), echo=None)
s.start(wait=sys.argv[2] == "wait")
print(s.proc.pid, flush=True)
if sys.argv[2] == "interrupt":
    s.wait_ready()
time.sleep(600)
"""


def _child(model: Path, mode: str) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(model), mode], stdout=subprocess.PIPE, text=True)
    CHILDREN.append(p)
    return p, int(p.stdout.readline())


CHILDREN: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_child_left():
    """Whatever a test does, the parent processes it started (and through their watchdogs, their servers) go."""
    yield
    while CHILDREN:
        p = CHILDREN.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


def test_killed_parent_takes_the_server_down(demo_dir):
    """A Jupyter kernel killed (restart, crash) must not leave its server behind: the watchdog stops it."""
    parent, pgid = _child(demo_dir, "wait")
    parent.kill()
    parent.wait()
    assert wait_group_gone(pgid), "server outlived the process that started it"


def test_interrupt_during_start_stops_the_server_quickly(demo_dir):
    parent, pgid = _child(demo_dir, "interrupt")
    time.sleep(3)
    t = time.monotonic()
    parent.send_signal(signal.SIGINT)  # what Jupyter's interrupt does to a kernel
    parent.wait(30)
    assert wait_group_gone(pgid, 20)
    assert time.monotonic() - t < 15  # generous on two busy cores; a hang or the 20 s SIGTERM grace fails
