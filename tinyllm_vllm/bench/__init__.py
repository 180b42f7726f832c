"""Benchmarks of TinyLLM on vLLM, one module per job.

* ``workload``   the requests: a chat-like length distribution (the headline) and the fixed
                 128+128 workload (best case for static batching), seeded and written as JSONL
                 that vLLM's own ``vllm bench`` reads too;
* ``engines``    one engine per subprocess: the plugin, vLLM's Qwen2 class on the same weights,
                 transformers ``generate`` in static batches and transformers' continuous batching;
* ``compare``    the offline comparison of those engines on one workload;
* ``sharing``    several engines side by side on one GPU, timed in lockstep;
* ``vllm_tools`` ``vllm bench throughput`` and ``vllm bench serve`` (several client processes);
* ``profile``    a py-spy profile of the engine core, summarised by frame;
* ``report``     tables and plots;
* ``cli``        ``tinyllm-vllm bench ...``.

Speed is measured in *useful* output tokens per second: the tokens the requests asked for.
Padding and tokens generated past a request's length (a static batch runs until its longest
request) are cost, not output.
"""
