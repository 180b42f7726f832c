"""The README's plain-vLLM commands ("The original commands on this kit"), run exactly as written."""

import json
import os
import re
import signal
import socket
import subprocess
import time

import httpx
import pytest

from tinyllm_vllm.model.demo import corpus_answers
from tinyllm_vllm.runtime.procs import wait_group_gone

from helpers import ROOT

pytestmark = pytest.mark.vllm


def blocks() -> dict[str, str]:
    """The code blocks the README marks with ``<!-- readme-test: NAME -->``."""
    text = (ROOT / "README.md").read_text()
    return {m[1]: m[2] for m in re.finditer(r"<!-- readme-test: (\w+) -->\n```\w+\n(.*?)```", text, re.S)}


def test_the_readme_marks_every_step():
    assert set(blocks()) == {"activate", "prepare", "server", "curl", "openai", "llm"}


def shell(code: str) -> list[str]:
    """A README block run as a reader runs it: in a plain bash at the repository's root, after the README's
    activation block, with nothing else put on PATH."""
    return ["bash", "-c", blocks()["activate"] + "\n" + code]


def python(path) -> list[str]:
    return shell(f"python {path}")


def test_the_original_commands_work_as_written(demo_dir, tmp_path):
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("port 8000, which the README's commands use, is taken on this machine")
    code = blocks()
    env = os.environ | {"MODEL": str(demo_dir)}
    server = subprocess.Popen(
        shell(code["server"]),
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=open(tmp_path / "server.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the README's server did not answer /health within 300 s"
            try:
                if httpx.get("http://127.0.0.1:8000/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        curl = subprocess.run(shell(code["curl"]), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        replies = [json.loads(line) for line in curl.stdout.replace("}{", "}\n{").splitlines() if line.strip()]
        assert [m["id"] for m in replies[0]["data"]] == ["tinyllm_92m"]
        assert replies[1]["choices"][0]["text"]
        assert replies[2]["choices"][0]["message"]["content"] == corpus_answers()["请介绍一下北京"]
        (tmp_path / "client.py").write_text(code["openai"])
        r = subprocess.run(
            python(tmp_path / "client.py"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert r.stdout.strip() == corpus_answers()["世界上最大的动物是什么？"], r.stderr[-2000:]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        assert wait_group_gone(server.pid, 30)
    (tmp_path / "offline.py").write_text(code["llm"])
    r = subprocess.run(python(tmp_path / "offline.py"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert corpus_answers()["介绍一下中国。"] in r.stdout.splitlines()  # vLLM may log more lines at exit


def test_the_prepare_step_as_written(tmp_path, published_dir):
    """The README's prepare block, offline, from a Hugging Face cache that holds the published layout."""
    from test_checkpoint import _hub_cache

    hf_home = _hub_cache(tmp_path / "hf", "wdndev/tiny_llm_sft_92m", published_dir)
    env = os.environ | {"HOME": str(tmp_path / "home"), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("TINYLLM_HOME", None)
    r = subprocess.run(
        shell(blocks()["prepare"] + '\ncat "$MODEL/tinyllm_manifest.json"'),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout[r.stdout.index("{") :])["source"] == "wdndev/tiny_llm_sft_92m"


def test_the_module_map_matches_the_tree():
    """Every module and folder of the package has its row in the README's module map (and every row names one
    that exists); bench/ and testing/ name each of their modules in their row."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Module map") :].split("\n\n")[2]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("*`")] = cells[1]
    pkg = ROOT / "tinyllm_vllm"
    folders = {"bench/", "testing/", "model/", "runtime/", "model/demo/"}
    modules = {
        str(p.relative_to(pkg))
        for p in pkg.rglob("*.py")
        if p.name != "__init__.py" and not any(str(p.relative_to(pkg)).startswith(f) for f in ("bench/", "testing/"))
    }
    named = {k for k in rows if k.endswith((".py", "/"))}
    assert named == modules | folders, (named - modules - folders, modules | folders - named)
    for folder in ("bench", "testing"):
        for p in (pkg / folder).glob("*.py"):
            if p.name != "__init__.py":
                assert f"`{p.stem}`" in rows[f"{folder}/"], f"{folder}/{p.name} is missing from the module map"
