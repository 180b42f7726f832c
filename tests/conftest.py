"""Shared fixtures. The tokenizer and its goldens are committed under tests/data; the reference checkpoint
is read from $TINYLLM_FIXTURES (``helpers``). Without it, its tests skip and the run says so loudly at its
start and ends with one line per reason for skipping; under CI they fail instead."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from helpers import FIXTURES, MISSING, data_path, fixture_path, make_published


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The 2-layer random-weight checkpoint with greedy goldens from the original modeling code."""
    return fixture_path("reference_tinyllm")


@pytest.fixture(scope="session")
def published_dir(tmp_path_factory, reference_dir) -> Path:
    """Reference weights + the real ChatGLM3 tokenizer, in the published repo's layout."""
    return make_published(
        tmp_path_factory.mktemp("pub") / "tiny_llm_sft_92m", reference_dir, data_path("chatglm3_tokenizer")
    )


@pytest.fixture(scope="session")
def prepared_tokenizer(tmp_path_factory) -> Path:
    """A tiny random-weight TinyLLM with the real ChatGLM3 tokenizer (tests/data), prepared: tokenizer tests
    need no reference checkpoint."""
    from tinyllm_vllm.model.checkpoint import prepare_checkpoint
    from tinyllm_vllm.model.demo import DEMO_SHAPE, random_model

    base = tmp_path_factory.mktemp("tok")
    src = random_model(base / "src", data_path("chatglm3_tokenizer", "tokenizer.model"), shape=DEMO_SHAPE)
    return prepare_checkpoint(src, base / "prepared", source="tokenizer-test")


@pytest.fixture(scope="session")
def prepared_ref(tmp_path_factory, published_dir) -> Path:
    from tinyllm_vllm.model.checkpoint import prepare_checkpoint

    return prepare_checkpoint(published_dir, tmp_path_factory.mktemp("prep") / "ref")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The embedded demo model, prepared (needs no fixture)."""
    from tinyllm_vllm.model.checkpoint import prepare_checkpoint
    from tinyllm_vllm.model.demo import demo_model

    base = tmp_path_factory.mktemp("demo")
    return prepare_checkpoint(demo_model(base / "src"), base / "prepared", source="demo")


@pytest.fixture(scope="session")
def cpu_settings(tmp_path_factory):
    from tinyllm_vllm.settings import Settings

    return Settings(
        home=tmp_path_factory.mktemp("home"), device="cpu", dtype="float32", max_model_len=512, kv_cache_gb=0.5
    )


@pytest.fixture(scope="session")
def demo_server(demo_dir, cpu_settings):
    """One real vLLM server on the demo model, shared by every test that only talks to it."""
    from tinyllm_vllm.runtime.procs import group_members
    from tinyllm_vllm.runtime.server import VLLMServer

    with VLLMServer(demo_dir, settings=cpu_settings, echo=None) as server:
        yield server
    assert not group_members(server.proc.pid), "the server left processes behind"


def pytest_report_header(config) -> list[str]:
    if (FIXTURES / "reference_tinyllm").exists():
        return [f"reference checkpoint: {FIXTURES / 'reference_tinyllm'}"]
    return ["!" * 100, f"!!! {MISSING}", "!!! the model-parity and checkpoint-layout tests will SKIP", "!" * 100]


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """One line per reason why tests were skipped, so a run without the fixtures says so at its end."""
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reasons[str(report.longrepr[2]).removeprefix("Skipped: ") if isinstance(report.longrepr, tuple) else "?"] += 1
    for reason, n in reasons.most_common():
        terminalreporter.write_line(f"skipped {n} test{'s' if n > 1 else ''}: {reason}")


def pytest_configure(config) -> None:
    """Under pytest-xdist, each worker and everything it starts runs on cores of its own: vLLM binds an engine's
    threads to cores it picks from what it may use, and two engines on one core slow each other many times over."""
    import os

    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if worker and count:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cores[int(worker.removeprefix("gw")) :: int(count)] or cores)
