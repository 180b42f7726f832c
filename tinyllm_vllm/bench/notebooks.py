"""``tinyllm-vllm bench walkthrough``: the notebooks as a learner runs them, timed -> walkthrough.json

Runs the numbered notebooks under nbmake in one fresh kit home (so the first start of each engine
configuration compiles, and later ones may reuse the cache), then reads back how long each notebook
took (pytest's JUnit report) and every engine, server and replica start the kit recorded
(``startup.record``: seconds, phases from vLLM's log, cold or not).
"""

from __future__ import annotations

import os
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from tinyllm_vllm.bench.compare import machine
from tinyllm_vllm.runtime import procs
from tinyllm_vllm.runtime.startup import read_starts


def walkthrough(
    model: str | Path, home: Path, notebooks: list[str], executed: Path | None = None, folder: Path | None = None
) -> dict:
    """Run the notebooks (default: every ``0*.ipynb`` in ``folder``, the repository's ``notebooks/``)."""
    NOTEBOOKS = (folder or Path.cwd() / "notebooks").resolve()
    if not NOTEBOOKS.is_dir():
        from tinyllm_vllm.errors import TinyllmError

        raise TinyllmError(f"{NOTEBOOKS}: no notebooks folder here (run from the repository's root)")
    names = notebooks or sorted(p.stem for p in NOTEBOOKS.glob("0*.ipynb"))
    junit = home / "walkthrough-junit.xml"
    env = os.environ | {"TINYLLM_MODEL": str(model), "TINYLLM_HOME": str(home)}
    if executed:
        env["TINYLLM_EXECUTED_DIR"] = str(executed)
    files = [f"{NOTEBOOKS.name}/{n}.ipynb" for n in names]
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--nbmake-timeout=900", *files]
    t = time.time()
    done = procs.run([*cmd, f"--junitxml={junit}"], env=env, capture=False, cwd=NOTEBOOKS.parent)
    runs = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        name = case.get("name").removesuffix(".ipynb")
        runs[name] = {"passed": failure is None, "seconds": round(float(case.get("time")), 1)}
        if failure is not None:
            runs[name]["failure"] = (failure.get("message") or "")[:2000]
    if executed:
        try:
            as_html(executed)
        except Exception as e:  # the timings matter more than the pages: `bench html` can make them later
            print(f"the executed notebooks stay .ipynb only ({type(e).__name__}: {e})", file=sys.stderr)
    starts = []
    for entry in read_starts(home):
        # which notebook it ran in: the one whose run spans its time
        entry["notebook"] = _notebook_at(entry["at"], t, runs)
        starts.append(
            {k: entry[k] for k in ("notebook", "what", "seconds", "cold", "phases", "timeline") if k in entry}
        )
    return {
        "kind": "walkthrough",
        "machine": machine(),
        "model": str(model),
        "command": " ".join(["pytest", *cmd[3:]]),  # from the folder above the notebooks, as a user runs it
        "runs": runs,
        "total_s": round(sum(r["seconds"] for r in runs.values()), 1),
        "starts": starts,
        "pytest_exit": done.returncode,
    }


def _notebook_at(at: float, t0: float, runs: dict) -> str | None:
    clock = t0
    for name, r in runs.items():  # JUnit lists the notebooks in the order they ran, one after another
        clock += r["seconds"]
        if at <= clock + 1:
            return name
    return None


def as_html(executed: Path) -> list[Path]:
    """Each executed notebook in ``executed`` also as a page a browser shows as the learner saw it
    (nbconvert's HTML); none when nbconvert is not installed (the .ipynb files stay either way)."""
    try:
        from nbconvert import HTMLExporter
    except ImportError:
        print(f"nbconvert is not installed: the executed notebooks stay .ipynb only in {executed}", file=sys.stderr)
        return []
    pages = []
    for nb in sorted(Path(executed).glob("*.ipynb")):
        body, _ = HTMLExporter().from_filename(str(nb))
        page = nb.with_suffix(".html")
        page.write_text(body, encoding="utf-8")
        pages.append(page)
    return pages
