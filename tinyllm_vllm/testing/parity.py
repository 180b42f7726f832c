"""Greedy parity of a TinyLLM engine against goldens made by the original ``modeling_tinyllm.py``.

A golden file (``golden_greedy.jsonl``) holds, per prompt, the prompt ids and 24 greedy steps with
each step's top-5 ids and logprobs. We run the same prompts greedily and compare token by token and
the first step's logprobs. Used by the tests (CPU) and by the H200 run:

    python -m tinyllm_vllm.testing.parity MODEL_DIR --dtype float32 bfloat16 --json results.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class PromptParity:
    prompt: str
    tokens_equal: int  # leading greedy tokens equal to the golden
    tokens_total: int
    first_step_max_logprob_delta: float  # over the golden's top-5 ids
    close: bool  # vLLM's check_logprobs_close rule: on a mismatch each token is in the other's top-5


def load_goldens(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def compare(golden: dict, tokens: list[int], logprobs: list[dict[int, float]]) -> PromptParity:
    """Compare one prompt's generated tokens and per-step {id: logprob} maps with its golden."""
    steps = golden["greedy"]
    equal = 0
    for step, tok in zip(steps, tokens, strict=False):
        if tok != step["token"]:
            break
        equal += 1
    close = True
    if equal < len(steps):
        if equal >= len(tokens):
            close = False
        else:
            step, mine = steps[equal], logprobs[equal]
            close = tokens[equal] in step["top5_ids"] and step["token"] in mine
    first = logprobs[0] if logprobs else {}
    deltas = [
        abs(first[i] - lp) for i, lp in zip(steps[0]["top5_ids"], steps[0]["top5_logprobs"], strict=True) if i in first
    ]
    missing = len(deltas) < len(steps[0]["top5_ids"])
    return PromptParity(golden["prompt"], equal, len(steps), float("inf") if missing else max(deltas), close)


def vllm_parity(model: str, goldens: list[dict], engine_options: dict) -> dict:
    """Run the goldens' prompts greedily through vLLM (the plugin) and compare. Returns a summary dict."""
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tinyllm_vllm.runtime.offline import new_llm

    n = len(goldens[0]["greedy"])
    t0 = time.perf_counter()
    llm = new_llm(model, {"skip_tokenizer_init": True, **engine_options})
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=n, logprobs=5, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=g["prompt_ids"]) for g in goldens], params)
    results = []
    for g, o in zip(goldens, outs, strict=True):
        c = o.outputs[0]
        lps = [{tid: lp.logprob for tid, lp in step.items()} for step in c.logprobs]
        results.append(compare(g, list(c.token_ids), lps))
    del llm
    return summarize(
        results,
        engine="vllm",
        vllm_version=vllm.__version__,
        engine_start_s=start_s,
        **{k: engine_options.get(k) for k in ("dtype", "tensor_parallel_size")},
    )


def hf_parity(model: str, goldens: list[dict], dtype: str = "float32", device: str = "cpu") -> dict:
    """The same comparison for the transformers reference model."""
    import torch
    import transformers

    from tinyllm_vllm.model.hf_model import TinyllmForCausalLM

    m = TinyllmForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()
    results = []
    for g in goldens:
        ids = torch.tensor([g["prompt_ids"]], device=device)
        out = m.generate(
            ids,
            max_new_tokens=len(g["greedy"]),
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
        toks = out.sequences[0, ids.shape[1] :].tolist()
        lps = []
        for s in out.scores:
            lp = torch.log_softmax(s[0].float(), -1)
            top = lp.topk(5)
            lps.append(
                dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))
                | {i: lp[i].item() for i in g["greedy"][0]["top5_ids"]}
            )
        results.append(compare(g, toks, lps))
    return summarize(results, engine="transformers", transformers_version=transformers.__version__, dtype=dtype)


def summarize(results: list[PromptParity], **meta) -> dict:
    return {
        **meta,
        "all_tokens_equal": all(r.tokens_equal == r.tokens_total for r in results),
        "all_close": all(r.close for r in results),
        "max_first_step_logprob_delta": max(r.first_step_max_logprob_delta for r in results),
        "prompts": [asdict(r) for r in results],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="checkpoint directory with golden_greedy.jsonl (or pass --goldens)")
    ap.add_argument("--goldens", help="golden file (default: MODEL/golden_greedy.jsonl)")
    ap.add_argument("--dtype", nargs="+", default=["float32"])
    ap.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--json", help="write the summaries here")
    args = ap.parse_args(argv)
    goldens = load_goldens(args.goldens or Path(args.model) / "golden_greedy.jsonl")
    summaries = []
    for dtype in args.dtype:
        if args.engine == "vllm":
            from tinyllm_vllm.settings import Settings

            settings = Settings.from_env(
                dtype=dtype, max_model_len=256, kv_cache_gb=0.5, enforce_eager=args.enforce_eager or None
            )
            options = settings.engine_options()
            if args.tensor_parallel_size > 1:
                options["tensor_parallel_size"] = args.tensor_parallel_size
            s = vllm_parity(args.model, goldens, options)
        else:
            s = hf_parity(args.model, goldens, dtype)
        summaries.append(s)
        print(json.dumps({k: v for k, v in s.items() if k != "prompts"}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2) + "\n")


if __name__ == "__main__":
    main()
