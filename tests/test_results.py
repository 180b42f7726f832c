"""The README's GPU numbers are the committed results': every number it quotes is in the file it names."""

import json
import re

from helpers import ROOT


def _summary():
    return json.loads((ROOT / "results" / "gpu" / "one_gpu.json").read_text())


def test_the_headline_keys_are_rebuilt_from_the_runs_unchanged():
    """`tinyllm-vllm bench report` derives the headline from the raw runs: the committed file agrees with it."""
    from tinyllm_vllm.bench.onegpu import summarized

    committed = _summary()
    assert summarized(committed) == committed


def test_readme_quotes_one_gpu_json():
    """The README's steady-state numbers are the file's; the serving figures the file lacks (the run was cut
    short) are the run's own progress lines in one_gpu.log; what the run did not measure is said."""
    s = _summary()
    scan = {x["engines"]: x["useful_tok_s"] for x in s["plan_scan"]}
    numbers = {
        "one engine": s["single_engine_useful_tok_s"],
        "the best offline configuration": s["best_offline"]["useful_tok_s"],
        "4 engines": scan.get(4),
        "the batch": s["batch"]["useful_tok_s"],
        "the batch's rows": s["batch"]["rows"],
    }
    for readme in (ROOT / "README.md", ROOT / "results" / "gpu" / "README.md"):
        text = readme.read_text()
        for what, value in numbers.items():
            if value is not None:
                assert f"{value:,.0f}" in text, f"{readme.name}: {what} {value:,.0f} not quoted"
    text = (ROOT / "README.md").read_text()
    assert f"{s['batch']['over_best_offline']:.2f}x the best offline figure" in text
    lo, hi = s["best_offline"]["spread"]
    assert f"({lo:,.0f}-{hi:,.0f})" in text
    assert f"{s['best_offline']['engines']} engines" in text and f"{s['best_offline']['gpu_busy']:.0%}" in text
    log = (ROOT / "results" / "gpu" / "one_gpu.log").read_text()
    served = re.findall(
        r"^\[one-gpu(?:\] |: )serving\]? \d+ in flight, run \d+: ([\d,]+) output tok/s steady.*$", log, re.M
    )
    assert served and all(", 0 failed, overlap 100%" in line for line in log.splitlines() if "in flight, run" in line)
    for steady in served:
        assert steady in text, f"README: the served figure {steady} of the log is not quoted"
    first, every = re.search(r"serving: first answer after (\d+) s, all replicas after (\d+) s", log).groups()
    assert f"first answer after {first} s" in text and f"all after {every} s" in text
    if not s["complete"]:  # a run cut short says what it lacks
        assert "Not measured in this run (it was cut short)" in text


def test_every_headline_run_follows_the_rule():
    """Timed >= 20 s over >= 8x the requests in flight; the batch holds >= 64k rows; nothing lost."""
    s = _summary()
    assert s["method"]["min_seconds"] >= 20 and s["method"]["min_factor"] >= 8 and s["method"]["repeats"] == 3
    best = s["best_offline"]
    assert best["seconds"] >= 20 and best["requests"] >= 8 * 1024 * best["engines"]
    assert all(x["seconds"] >= 20 for x in s["plan_scan"] if x.get("useful_tok_s"))
    assert s["batch"]["rows"] >= 65536
    serving = s["serving"]
    if serving["best"]:
        assert serving["best"]["requests"] >= 8 * serving["best"]["concurrency"] and serving["best"]["seconds"] >= 20
        assert serving["failed"] == 0 and serving["client_overlap_min"] >= 0.9


def _starts():
    return json.loads((ROOT / "results" / "gpu" / "starts.json").read_text())


def test_the_starts_summary_is_rebuilt_from_the_starts_unchanged():
    from tinyllm_vllm.bench.starts import summarized

    committed = _starts()
    assert summarized(json.loads(json.dumps(committed))) == committed


def test_readmes_quote_starts_json():
    s = _starts()["summary"]
    keys = ("first_start_s", "later_start_s", "server_after_offline_s", "replicas_all_ready_s", "O0_first_start_s")
    for readme in (ROOT / "README.md", ROOT / "results" / "gpu" / "README.md"):
        text = readme.read_text()
        for key in keys:
            assert f"{s[key]:.1f} s" in text or f"| {s[key]:.1f} |" in text, f"{readme.name}: {key} {s[key]} not quoted"
    assert s["server_compile_cache_hit"] is True and s["replicas"] == 4


def test_readmes_quote_the_serve_starts():
    """serve's start on the GPU (``bench starts --starts serve``): a fresh and a warm home, first answer and all
    replicas, requests sent during the joins and none failed; both READMEs quote the file."""
    from tinyllm_vllm.bench.starts import summarized

    committed = _gpu("serve_starts.json")
    assert summarized(json.loads(json.dumps(committed))) == committed
    fresh, warm = committed["serve"][:2]
    assert [fresh["what"], warm["what"]] == ["serve, fresh home", "serve, same home again"]
    assert fresh["cold"] and not warm["cold"]
    for r in (fresh, warm):
        assert r["requests_during_joins"] > 0 and r["failed_during_joins"] == 0
        assert {"replicas", "first_answer_s", "all_replicas_s"} <= r.keys() and len(r["starts"]) == r["replicas"]
        assert all({"phases", "timeline"} <= st.keys() for st in r["starts"])
    for readme in (ROOT / "README.md", ROOT / "results" / "gpu" / "README.md"):
        text = readme.read_text()
        for r in (fresh, warm):
            for key in ("first_answer_s", "all_replicas_s"):
                assert f"{r[key]:.1f} s" in text, f"{readme.name}: {r['what']} {key} {r[key]} not quoted"


def _gpu(name: str) -> dict:
    return json.loads((ROOT / "results" / "gpu" / name).read_text())


def test_the_gpu_walkthrough_ran_every_notebook_and_recorded_its_starts():
    from tinyllm_vllm.bench.report import walkthrough_tables

    w = _gpu("walkthrough.json")
    assert list(w["runs"]) == [p.stem for p in sorted((ROOT / "notebooks").glob("0[0-5]_*.ipynb"))]
    assert all(r["passed"] for r in w["runs"].values()) and w["pytest_exit"] == 0
    assert w["machine"]["gpu"].startswith("NVIDIA") and w["machine"]["cpu_count"] > 0
    assert {"02_offline_generation", "03_openai_api_server", "05_scaling_out"} <= {s["notebook"] for s in w["starts"]}
    for start in w["starts"]:
        assert {"notebook", "what", "seconds", "cold", "phases", "timeline"} <= start.keys()
    w6 = _gpu("walkthrough_06.json")
    (six,) = w6["runs"].values()
    assert six["passed"] and [s["what"] for s in w6["starts"]] == ["Ray Serve LLM app"]
    # the results README shows the tables `bench report` prints from the files, and the README their numbers
    gpu_readme, readme = (ROOT / "results" / "gpu" / "README.md").read_text(), (ROOT / "README.md").read_text()
    assert walkthrough_tables(w) in gpu_readme
    assert walkthrough_tables(w6).splitlines()[-1] in gpu_readme  # its start, in the same table
    assert f"in {six['seconds']:.1f} s" in gpu_readme and f"| {six['seconds']:.1f} s |" in readme
    assert f"{w['total_s']:.1f} s in all" in readme
    for name, run in w["runs"].items():
        assert f"| `{name}` |" in readme and f"| {run['seconds']:.1f} s" in readme
    first = {s["notebook"]: s["seconds"] for s in w["starts"]}
    replicas = max(s["seconds"] for s in w["starts"] if s["notebook"] == "05_scaling_out")
    for value in (first["02_offline_generation"], first["03_openai_api_server"], replicas):
        assert f"{value:.1f} s" in readme


def test_every_committed_gpu_throughput_run_lasted_20_s():
    """No committed GPU result times a wave: every run that carries its duration lasted at least 20 s."""
    short = []

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("duration_s", "elapsed_s") and isinstance(value, int | float) and value < 20:
                    short.append(f"{where}.{key}={value:.1f}")
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    for path in sorted((ROOT / "results" / "gpu").glob("*.json")):
        walk(json.loads(path.read_text()), path.name)
    assert not short, short
