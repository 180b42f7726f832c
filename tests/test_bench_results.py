"""How the benchmarks turn raw records into the numbers the README quotes: several vllm bench serve clients
merged into one level, and a py-spy profile summarised by process and by engine step."""

from tinyllm_vllm.bench import profile, vllm_tools


def client(start: float, duration: float, tokens: int, requests: int = 2) -> dict:
    """One ``vllm bench serve --save-detailed`` result, with the fields ``merge`` reads."""
    return {
        "duration": duration,
        "completed": requests,
        "failed": 0,
        "total_output_tokens": tokens,
        "start_times": [start + i * 0.1 for i in range(requests)],
        "ttfts": [0.05] * requests,
        "errors": [""] * requests,
        "itls": [[0.01, 0.01]] * requests,
    }


def test_staggered_clients_count_over_the_whole_run():
    # the second client started 5 s late: 2000 tokens came over 15 s, not over the longest client's 10 s
    merged = vllm_tools.merge([client(100.0, 10.0, 1000), client(105.0, 10.0, 1000)], concurrency=8, clients=2)
    assert merged["duration_s"] == 15.0
    assert merged["client_start_spread_s"] == 5.0
    assert round(merged["output_tok_s"], 3) == round(2000 / 15, 3)
    assert merged["completed"] == 4


def test_clients_without_start_times_fall_back_to_the_longest_client():
    old = [client(0.0, 10.0, 1000), client(0.0, 8.0, 600)]
    for c in old:
        del c["start_times"]
    assert vllm_tools.span(old) == (10.0, 0.0)


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
