"""Repository rules a learner relies on: notebooks from their sources, stripped, runnable; pins in one place."""

import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

from helpers import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOURCES = sorted((ROOT / "notebooks" / "src").glob("0*.py"))


def test_notebooks_are_numbered_and_stripped():
    assert [p.name[:3] for p in NOTEBOOKS] == [f"{i:02d}_" for i in range(len(NOTEBOOKS))]
    assert len(NOTEBOOKS) >= 5
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == "python3", path.name
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, f"{path.name} has outputs"


def test_every_notebook_is_built_from_its_source_with_no_diff():
    """notebooks/src/NN_name.py (jupytext py:percent) is the source; the .ipynb must hold the same cells."""
    import jupytext
    import nbformat

    assert [p.stem for p in SOURCES] == [p.stem for p in NOTEBOOKS]
    for source, path in zip(SOURCES, NOTEBOOKS, strict=True):
        want = jupytext.read(source)
        have = nbformat.read(path, as_version=4)

        def cells(nb):
            return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]

        assert cells(have) == cells(want), f"{path.name} differs from {source.name}: run `make notebooks`"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_notebooks_use_the_package_and_parameters(path):
    import jupytext

    nb = jupytext.read(path)
    sources = [c.source for c in nb.cells if c.cell_type == "code"]
    assert any("tinyllm_vllm" in s for s in sources)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert params and "Settings.from_env()" in params[0].source
    assert not any(re.search(r"^\s*!", s, re.M) for s in sources), "no shell escapes in the tested path"


def test_environment_yml_matches_pyproject():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    text = (ROOT / "environment.yml").read_text()
    assert "python=3.12" in text
    m = re.search(r"-e \.\[([a-z,]+)\]", text)
    assert m, "environment.yml must install the kit editable with extras"
    wanted = m.group(1).split(",")
    assert "cuda" in wanted and "notebooks" in wanted and "cpu" not in wanted
    assert set(wanted) <= set(extras), f"unknown extras {set(wanted) - set(extras)}"
    assert any("modelscope" in dep for dep in extras["notebooks"]), "notebook readers in China need ModelScope"


def test_ci_lints_and_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci and "make lint" in ci


def test_no_file_outside_the_repository_is_cited():
    outside = "shared" + "/docs"  # the research notes beside the repository, which users do not have
    for path in [*ROOT.glob("tinyllm_vllm/**/*.py"), *ROOT.glob("tests/*.py")]:
        assert outside not in path.read_text(), path


@pytest.mark.slow
def test_the_plugin_imports_no_doctor_bench_or_harness():
    """vLLM runs register() in every process it starts: it stays small (the version check is ``versions``)."""
    code = (
        "import sys, tinyllm_vllm.model.plugin as p; p.register(); "
        "print(sorted(m for m in sys.modules if m.startswith('tinyllm_vllm.')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = r.stdout.strip().splitlines()[-1]
    assert "tinyllm_vllm.model.versions" in loaded
    for heavy in ("tinyllm_vllm.doctor", "tinyllm_vllm.bench", "tinyllm_vllm.testing"):
        assert heavy not in loaded, loaded


@pytest.mark.slow
def test_an_offline_engine_leaves_the_model_inspection_for_a_later_server(tmp_path):
    """A server's front end registers the class by import path, and vLLM inspects such a class in a fresh
    Python process unless its cache has the inspection: the offline engine's registration leaves it there."""
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path)}
    offline = "import tinyllm_vllm.model.plugin as p; p.register_class_here()"
    r = subprocess.run([sys.executable, "-c", offline], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    server = (
        "import logging; logging.basicConfig(level=logging.DEBUG); "
        "import tinyllm_vllm.model.plugin as p; from vllm import ModelRegistry; p.register(); "
        "print(ModelRegistry._try_inspect_model_cls(p.ARCH))"
    )
    r = subprocess.run([sys.executable, "-c", server], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        "Loaded model info for class tinyllm_vllm.model.vllm_model.TinyllmForCausalLM from cache" in r.stdout + r.stderr
    )
    assert "architecture='TinyllmForCausalLM'" in r.stdout and "is_text_generation_model=True" in r.stdout
