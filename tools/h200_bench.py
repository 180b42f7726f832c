"""The H200 benchmark run (vLLM 0.26.0 through ../shared/gpu), one part per device call:

    python3 tools/h200_bench.py offline|tune|tune2|tune3|hf|serve    (writes bench_<part>.json into $OUT)

The model is a random-weight TinyLLM of the published 92M shape (8 layers, hidden 512, 8 heads,
intermediate 1408) with the real ChatGLM3 vocabulary (64798), built by demo_model + prepare.
"""

import json
import os
import sys
from pathlib import Path

from tinyllm_vllm import bench
from tinyllm_vllm.checkpoint import demo_model, prepare_checkpoint
from tinyllm_vllm.settings import Settings

N, IN, OUTLEN = 1024, 128, 128
# each variant adds to the previous one; what each setting does is explained in results/h200/README.md
VARIANTS = {
    "max_num_seqs=1024": {"max_num_seqs": 1024},
    "+max_num_batched_tokens=16384": {"max_num_seqs": 1024, "max_num_batched_tokens": 16384},
    "+cudagraph up to 1024": {"max_num_seqs": 1024, "max_num_batched_tokens": 16384,
                              "compilation_config": {"max_cudagraph_capture_size": 1024}},
    "+async_scheduling": {"max_num_seqs": 1024, "max_num_batched_tokens": 16384,
                          "compilation_config": {"max_cudagraph_capture_size": 1024}, "async_scheduling": True},
}
# second round: less per-step host work (no prefix-cache hashing, the whole prefill in one step)
VARIANTS2 = {
    "+no prefix caching": {"max_num_seqs": 1024, "max_num_batched_tokens": 16384, "async_scheduling": True,
                           "compilation_config": {"max_cudagraph_capture_size": 1024}, "enable_prefix_caching": False},
    "+max_num_batched_tokens=131072": {"max_num_seqs": 1024, "max_num_batched_tokens": 131072,
                                       "async_scheduling": True, "enable_prefix_caching": False,
                                       "compilation_config": {"max_cudagraph_capture_size": 1024}},
}


# third round: several engines side by side on the one GPU (each with 1/k of the prompts and memory)
_BEST = {"max_num_seqs": 1024, "max_num_batched_tokens": 16384, "async_scheduling": True,
         "compilation_config": {"max_cudagraph_capture_size": 1024}}
VARIANTS3 = {f"{k} engines per GPU": _BEST | {"engines_per_gpu": k} for k in (2, 4)}


def main(part: str) -> None:
    out = Path(os.environ.get("OUT", "."))
    src = demo_model("/tmp/m92-src", layers=8, hidden=512, heads=8, intermediate=1408,
                     spm_model=Path(".gpudata/tokenizer.model"))
    model = str(prepare_checkpoint(src, "/tmp/m92"))
    s = Settings.from_env()
    base = s.engine_args()
    base["gpu_memory_utilization"] = 0.8
    if part == "offline":
        r = bench.offline(model, list(bench.ENGINES), N, IN, OUTLEN, base, hf_batch_sizes=[64, 256, 1024], repeats=3)
    elif part == "tune":
        r = bench.tune(model, VARIANTS, N, IN, OUTLEN, base, repeats=3)
    elif part == "tune2":
        r = bench.tune(model, VARIANTS2, N, IN, OUTLEN, base, repeats=3)
    elif part == "tune3":
        r = bench.tune(model, VARIANTS3, N, IN, OUTLEN, base, repeats=3)
    elif part == "hf":
        r = bench.offline(model, ["transformers"], N, IN, OUTLEN, base, hf_batch_sizes=[64, 256, 1024])
    else:
        s.gpu_util = 0.8
        r = bench.serve(model, [1, 16, 64, 256], 32, IN, OUTLEN, s)
    (out / f"bench_{part}.json").write_text(json.dumps(r, indent=2) + "\n")
    print(bench.table(r))


if __name__ == "__main__":
    main(sys.argv[1])
