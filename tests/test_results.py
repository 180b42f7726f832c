"""The README's GPU headline is the committed one_gpu.json: every number it quotes is the file's."""

import json

from helpers import ROOT


def _summary():
    return json.loads((ROOT / "results" / "gpu" / "one_gpu.json").read_text())


def test_the_headline_keys_are_rebuilt_from_the_runs_unchanged():
    """`tinyllm-vllm bench report` derives the headline from the raw runs: the committed file agrees with it."""
    from tinyllm_vllm.bench.onegpu import summarized

    committed = _summary()
    assert summarized(committed) == committed


def test_readme_quotes_one_gpu_json():
    s = _summary()
    srv = s["serving"]
    numbers = {
        "one engine": s["single_engine_useful_tok_s"],
        "the kit's configuration": s["best_offline"]["useful_tok_s"],
        "vLLM's Qwen2 class": s["qwen2_useful_tok_s"],
        "transformers at its best": s["transformers_best_useful_tok_s"],
        "one server": srv["single_server_tok_s"],
        "replicas": srv["best"]["tok_s"],
    }
    for readme in (ROOT / "README.md", ROOT / "results" / "gpu" / "README.md"):
        text = readme.read_text()
        for what, value in numbers.items():
            assert f"{value:,.0f}" in text, f"{readme.name}: {what} {value:,.0f} not quoted"
    text = (ROOT / "README.md").read_text()
    ratio = s["best_offline"]["useful_tok_s"] / s["transformers_best_useful_tok_s"]
    assert f"**{ratio:.1f}x** transformers' best" in text
    assert f"({srv['best']['tok_s'] / srv['single_server_tok_s']:.1f}x;" in text
    assert f"{s['single_engine_gpu_busy']:.0%} of the time" in text
    assert f"{s['best_offline']['gpu_busy']:.0%} busy" in text


def test_serving_levels_ran_together_and_lost_nothing():
    s = _summary()["serving"]
    assert s["client_overlap_min"] >= 0.9 and s["failed"] == 0


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
