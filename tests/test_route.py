"""`tinyllm-vllm route`: vllm-router over vLLM servers addressed as separate hosts, one endpoint."""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tinyllm_vllm.client import metric, openai_client
from tinyllm_vllm.model.demo import corpus_answers
from tinyllm_vllm.runtime.server import VLLMServer

pytestmark = pytest.mark.vllm


def test_a_worker_that_is_no_url_is_named():
    r = subprocess.run(
        [sys.executable, "-m", "tinyllm_vllm.cli", "route", "--workers", "localhost:8000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "error: --workers localhost:8000: expected http://HOST:PORT" in r.stderr


def test_route_over_two_servers_as_separate_hosts(demo_server, demo_dir, cpu_settings, tmp_path):
    with VLLMServer(demo_dir, settings=cpu_settings, echo=None) as second:
        # two names for this machine stand in for two hosts
        workers = [f"http://127.0.0.1:{demo_server.port}", f"http://localhost:{second.port}"]
        env = os.environ | {"TINYLLM_HOME": str(tmp_path)}
        cmd = [sys.executable, "-m", "tinyllm_vllm.cli", "route", "--workers", *workers, "--port", "0"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            line = p.stdout.readline()
            url = re.search(r"routing at (http://\S+/v1) over 2 workers", line)[1]
            before = [metric(s, "vllm:request_success_total") for s in (demo_server, second)]
            client = openai_client(url)
            for _ in range(4):  # round robin: both workers answer
                chat = client.chat.completions.create(
                    model="tinyllm_92m", messages=[{"role": "user", "content": "你好"}], max_tokens=32, temperature=0
                )
                assert chat.choices[0].message.content == corpus_answers()["你好"]
            after = [metric(s, "vllm:request_success_total") for s in (demo_server, second)]
            assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
            t = time.monotonic()
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=60)
            assert p.returncode == 130 and "interrupted: stopped vllm-router" in err, err
            assert time.monotonic() - t < 15
            with pytest.raises(httpx.HTTPError):
                httpx.get(url + "/models", timeout=5)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
