#!/usr/bin/env bash
# The container's start: prepare the model once (kept under $TINYLLM_HOME), then vLLM's own server on it.
# Extra arguments go to `vllm serve` (docker run IMAGE --max-num-seqs 256).
set -euo pipefail
model=$(python3 -c "
import os
from tinyllm_vllm.model.sources import ensure_model
print(ensure_model(os.environ['TINYLLM_MODEL'], os.environ['TINYLLM_HOME'])[0])")
# --model-impl vllm: without the plugin, loading fails instead of falling back to another implementation
exec vllm serve "$model" --served-model-name "${TINYLLM_SERVED_NAME:-tinyllm_92m}" --host 0.0.0.0 --port 8000 \
  --max-model-len "${TINYLLM_MAX_MODEL_LEN:-1024}" --model-impl vllm "$@"
