"""`make lab`, the README's way in, starts JupyterLab; these machines run it as root, as containers and cloud
notebooks do, where `jupyter lab` alone refuses to start."""

import os
import signal
import subprocess
import time

import httpx
import pytest

from tinyllm_vllm.runtime.procs import hold_port, wait_group_gone

from helpers import ROOT


@pytest.mark.slow
def test_make_lab_serves_the_notebooks(tmp_path):
    with hold_port() as held:
        port = held.getsockname()[1]
    args = f"--no-browser --ip 127.0.0.1 --port {port} --ServerApp.token= --ServerApp.password="
    lab = subprocess.Popen(
        ["make", "-s", "lab", f"LAB_ARGS={args}"],
        cwd=ROOT,
        start_new_session=True,
        stdout=open(tmp_path / "lab.log", "w"),
        stderr=subprocess.STDOUT,
        env=os.environ | {"JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")},
    )
    try:
        deadline, page = time.monotonic() + 120, None
        while time.monotonic() < deadline and page is None:
            assert lab.poll() is None, (tmp_path / "lab.log").read_text()[-2000:]
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/lab", timeout=5)
            except httpx.HTTPError:
                time.sleep(0.5)
        assert page is not None and page.status_code == 200 and "JupyterLab" in page.text
        contents = httpx.get(f"http://127.0.0.1:{port}/api/contents", timeout=10).json()
        names = sorted(c["name"] for c in contents["content"])
        # one entry per notebook: the jupytext sources live in src/, the nbmake checks in the root conftest.py
        assert names == sorted([p.name for p in (ROOT / "notebooks").glob("*.ipynb")] + ["src"]), names
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        assert wait_group_gone(lab.pid, 30)
