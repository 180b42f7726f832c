"""Repository rules a learner relies on: notebooks stripped and runnable, env file in step with pyproject."""

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_are_numbered_and_stripped():
    assert [p.name[:3] for p in NOTEBOOKS] == [f"{i:02d}_" for i in range(len(NOTEBOOKS))]
    assert len(NOTEBOOKS) >= 4
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == "python3", path.name
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_use_the_package_and_parameters(path):
    nb = json.loads(path.read_text())
    sources = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert any("tinyllm_vllm" in s for s in sources)
    params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert params and "Settings.from_env()" in "".join(params[0]["source"])
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


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make test" in (ROOT / ".ci" / "run").read_text()
