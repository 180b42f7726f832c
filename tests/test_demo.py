"""`make demo` (``python -m tinyllm_vllm.walkthrough``) as a newcomer sees it: each process logs to its own
file, and each printed curl line is followed by what curl prints."""

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vllm


def test_make_demo_logs_each_process_to_its_own_file(demo_dir, tmp_path):
    env = os.environ | {"TINYLLM_MODEL": str(demo_dir), "TINYLLM_HOME": str(tmp_path), "TINYLLM_KV_CACHE_GB": "0.5"}
    r = subprocess.run(
        [sys.executable, "-m", "tinyllm_vllm.walkthrough"], env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    engine_log = tmp_path / re.search(r"starting the vLLM engine \(log: .*/(vllm-engine-[^)]+)\)", out)[1]
    server_log = tmp_path / re.search(r"log: .*/(vllm-server-[^\s)]+\.log)", out)[1]
    engine_log, server_log = tmp_path / "logs" / engine_log.name, tmp_path / "logs" / server_log.name
    server_text, engine_text = server_log.read_text(), engine_log.read_text()
    # the server's own INFO records (its API server process tags them) are in its file, none in the engine's
    assert "INFO" in server_text and "(APIServer pid=" in server_text, server_text[-2000:]
    assert "(APIServer pid=" not in engine_text and "EngineDeadError" not in engine_text
    lines = r.stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("$ curl"):
            body = json.loads(lines[i + 1])  # what curl prints: the server's JSON, as it sent it
            assert body["object"] in ("list", "text_completion", "chat.completion"), lines[i + 1]
