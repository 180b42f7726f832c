"""How the benchmarks turn raw records into the numbers the README quotes: a barrier-started serving load
summarised (throughput over the whole span, how long every client was sending), and a py-spy profile
summarised by process and by engine step."""

from tinyllm_vllm.bench import load, profile


def client(start: float, end: float, tokens: int = 100, requests: int = 2, error: str | None = None) -> dict:
    """One load client's records: ``requests`` requests between ``start`` and ``end``."""
    recs = [
        {"sent": start, "first": start + 0.05, "end": end, "tokens": tokens, "error": None} for _ in range(requests)
    ]
    if error:
        recs[-1]["error"] = error
    return {"records": recs, "cpu_share": 0.3}


def test_clients_that_ran_together_make_a_valid_level():
    level = load.summarize([client(100.0, 110.0), client(100.1, 110.2)], concurrency=8)
    assert level["client_overlap"] > 0.95 and level["valid"]
    assert round(level["output_tok_s"], 3) == round(400 / 10.2, 3)


def test_a_late_client_makes_the_level_invalid():
    # the second client started 5 s late: for a third of the span only one client was sending
    level = load.summarize([client(100.0, 110.0), client(105.0, 115.0)], concurrency=8)
    assert round(level["client_overlap"], 3) == round(5 / 15, 3) and not level["valid"]
    assert level["duration_s"] == 15.0


def test_a_failed_request_makes_the_level_invalid():
    level = load.summarize([client(0.0, 10.0), client(0.0, 10.0, error="HTTP 500: boom")], concurrency=8)
    assert level["failed"] == 1 and level["errors"] == ["HTTP 500: boom"] and not level["valid"]


FRONT = 'process 1:"python -m tinyllm_vllm.bench.engines"'
CORE = FRONT + ';process 2:"VLLM::EngineCore";loop (core.py)'
RAW = "\n".join(
    [
        f"{FRONT};run (engines.py);detok (detokenizer.py) 30",
        f"{CORE};EngineCore.step (core.py);Scheduler.schedule (scheduler.py) 40",
        f"{CORE};EngineCore.step (core.py);execute_model (runner.py);forward (model.py) 35",
        f"{CORE};EngineCore.step (core.py) 5",
        f"{CORE};send (core.py) 20",
    ]
)


def test_profile_summaries(tmp_path):
    raw = tmp_path / "profile.raw.txt"
    raw.write_text(RAW)
    # 2 s at 50 samples/s: the engine core ran 100 of 100 ticks, the front process 30
    assert profile.busy(raw, seconds=2, rate=50) == {
        "VLLM::EngineCore": 1.0,
        "python -m tinyllm_vllm.bench.engines": 0.3,
    }
    assert profile.under(raw, "EngineCore.step") == {
        "Scheduler.schedule (scheduler.py)": 0.4,
        "execute_model (runner.py)": 0.35,
        "(outside)": 0.2,
        "(self)": 0.05,
    }
    core = profile.summarize(raw)
    assert core["samples"] == 100
    assert core["self"][0] == {"frame": "Scheduler.schedule (scheduler.py)", "share": 0.4}
    front = profile.summarize(raw, process="tinyllm_vllm.bench.engines")
    assert front["samples"] == 30 and front["self"] == [{"frame": "detok (detokenizer.py)", "share": 1.0}]


def test_executed_notebooks_become_pages_that_show_what_the_cells_printed(tmp_path):
    import nbformat

    from tinyllm_vllm.bench.notebooks import as_html

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print('replica 1/4 ready')")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="replica 1/4 ready after 52 s\n")]
    nb.cells = [nbformat.v4.new_markdown_cell("# 05 · Scaling out"), cell]
    nbformat.write(nb, tmp_path / "05_scaling_out.ipynb")
    (page,) = as_html(tmp_path)
    assert page == tmp_path / "05_scaling_out.html"
    html = page.read_text(encoding="utf-8")
    assert "replica 1/4 ready after 52 s" in html and "Scaling out" in html
