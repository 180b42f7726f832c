"""`tinyllm-vllm route`: a worker address that is no URL is named (the route over two running servers is in
``test_replicas``, on the replicas' servers)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the command in a subprocess; it starts no engine


def test_a_worker_that_is_no_url_is_named():
    r = subprocess.run(
        [sys.executable, "-m", "tinyllm_vllm.cli", "route", "--workers", "localhost:8000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "error: --workers localhost:8000: expected http://HOST:PORT" in r.stderr
