"""What nbmake's notebook runs must also show a learner: a step's result, not the engine's log.

After nbmake executes a notebook, its outputs are checked: a cell that starts an engine or a server
prints at most ``MAX_LINES`` lines of its own, and no cell shows vLLM's detokenization warning or
tqdm's "IProgress not found" warning. With ``TINYLLM_EXECUTED_DIR`` set, the executed notebooks
(outputs kept) are written there, for a reader to see what each step prints.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbmake.nb_run import NotebookRun

MAX_LINES = 8  # the start, one line per phase of it (weights, compile, CUDA graphs, ...), ready
STARTS_SOMETHING = re.compile(r"load_llm\(|\.start\(|Replicas\(|\boffline\(|launch\(")
NEVER = ("Encountered invalid prefix detokenization error", "TqdmWarning", "IProgress not found")

_executed: dict[str, nbformat.NotebookNode] = {}
_execute = NotebookRun.execute


def _keep_result(self: NotebookRun):
    result = _execute(self)
    _executed[str(self.filename)] = result.nb
    return result


NotebookRun.execute = _keep_result


def printed_lines(cell: nbformat.NotebookNode) -> list[str]:
    """The lines a code cell printed itself (stdout/stderr), not the value it displays."""
    return [
        line
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
        for line in out.get("text", "").splitlines()
        if line.strip()
    ]


def problems(nb: nbformat.NotebookNode) -> list[str]:
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        text = "\n".join(printed_lines(cell)) + "\n".join(str(o) for o in cell.get("outputs", []))
        found += [f"cell {i} shows {never!r}" for never in NEVER if never in text]
        lines = printed_lines(cell)
        if STARTS_SOMETHING.search(cell.source) and len(lines) > MAX_LINES:
            found.append(f"cell {i} starts an engine or server and prints {len(lines)} lines:\n  " + "\n  ".join(lines))
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    outcome = yield
    nb = _executed.pop(str(Path(item.config.rootdir) / getattr(item, "filename", "")), None)
    if nb is None:
        return
    if os.environ.get("TINYLLM_EXECUTED_DIR"):
        target = Path(os.environ["TINYLLM_EXECUTED_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target / Path(item.filename).name)
    if outcome.excinfo is None:
        found = problems(nb)
        if found:
            pytest.fail(
                f"{Path(item.filename).name}: the cells show the engine's log, not the step's result:\n"
                + "\n".join(found),
                pytrace=False,
            )
