"""One settings object read from environment variables, shared by the CLI, notebooks and tests.

A notebook run under nbmake and a learner's run differ only in environment:

    TINYLLM_MODEL        auto (default: the published model if it can be downloaded, else the demo
                         model), demo, a hub id (wdndev/tiny_llm_sft_92m), modelscope:ID, or a directory
    TINYLLM_HOME         where prepared checkpoints and server logs go (default ~/.cache/tinyllm-vllm)
    TINYLLM_DEVICE       auto | cpu | cuda (what vLLM will run on; auto asks vLLM)
    TINYLLM_DTYPE        auto | float32 | bfloat16 | float16 (default: float32 on CPU, auto on GPU)
    TINYLLM_MAX_MODEL_LEN  context length (default 1024, TinyLLM's trained length)
    TINYLLM_MAX_TOKENS   tokens to generate in examples (default 64)
    TINYLLM_KV_CACHE_GB  CPU only: KV-cache size in GiB (default 1)
    TINYLLM_GPU_UTIL     GPU only: fraction of GPU memory vLLM may use (default 0.5)
    TINYLLM_ENFORCE_EAGER  1 to skip torch.compile / CUDA graphs (default: 1 on CPU, 0 on GPU)
    TINYLLM_SERVED_NAME  model name the server answers to (default tinyllm_92m)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _bool(value: str) -> bool:
    return value.lower() in ("1", "true", "yes", "on")


def detect_device() -> str:
    """What vLLM runs on here, without initialising CUDA in this process."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return "cpu"
    return "cpu" if current_platform.device_type == "cpu" else current_platform.device_type


@dataclass
class Settings:
    model: str = "auto"
    home: Path = field(default_factory=lambda: Path.home() / ".cache" / "tinyllm-vllm")
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int = 1024
    max_tokens: int = 64
    kv_cache_gb: float = 1.0
    gpu_util: float = 0.5
    enforce_eager: bool | None = None
    served_name: str = "tinyllm_92m"

    @classmethod
    def from_env(cls) -> Settings:
        s = cls(
            model=_env("TINYLLM_MODEL", "auto"),
            home=Path(_env("TINYLLM_HOME", str(Path.home() / ".cache" / "tinyllm-vllm"))).expanduser(),
            device=_env("TINYLLM_DEVICE", "auto"),
            dtype=_env("TINYLLM_DTYPE", "auto"),
            max_model_len=int(_env("TINYLLM_MAX_MODEL_LEN", "1024")),
            max_tokens=int(_env("TINYLLM_MAX_TOKENS", "64")),
            kv_cache_gb=float(_env("TINYLLM_KV_CACHE_GB", "1")),
            gpu_util=float(_env("TINYLLM_GPU_UTIL", "0.5")),
            enforce_eager=_bool(os.environ["TINYLLM_ENFORCE_EAGER"]) if os.environ.get("TINYLLM_ENFORCE_EAGER") else None,
            served_name=_env("TINYLLM_SERVED_NAME", "tinyllm_92m"),
        )
        return s.resolved()

    def resolved(self) -> Settings:
        """Fill in what depends on the device (done once, so everything downstream sees plain values)."""
        if self.device == "auto":
            self.device = detect_device()
        cpu = self.device == "cpu"
        if self.dtype == "auto" and cpu:
            # bf16 on CPUs without AVX512-BF16 is emulated (slow); fp32 is also exact vs transformers
            self.dtype = "float32"
        if self.enforce_eager is None:
            self.enforce_eager = cpu
        return self

    def engine_args(self) -> dict:
        """Keyword arguments for ``vllm.LLM`` (the server handle turns the same into flags)."""
        args = {"dtype": self.dtype, "max_model_len": self.max_model_len, "enforce_eager": self.enforce_eager,
                "model_impl": "vllm", "seed": 0}
        if self.device == "cpu":
            args["kv_cache_memory_bytes"] = int(self.kv_cache_gb * (1 << 30))
        else:
            args["gpu_memory_utilization"] = self.gpu_util
        return args
