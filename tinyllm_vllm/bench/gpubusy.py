"""How busy the GPU was during a timed run: nvidia-smi's utilization, sampled every 200 ms meanwhile."""

from __future__ import annotations

import shutil
import threading
from typing import TYPE_CHECKING

from tinyllm_vllm.runtime import procs

if TYPE_CHECKING:
    import subprocess


class GpuBusy:
    """``with GpuBusy() as busy: ...`` then ``busy.mean`` (0..1 per GPU, averaged) or None without a GPU."""

    def __init__(self, interval_ms: int = 200) -> None:
        self.interval_ms = interval_ms
        self.samples: list[float] = []
        self.proc: subprocess.Popen | None = None  # nvidia-smi's sampler
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GpuBusy:
        smi = shutil.which("nvidia-smi")
        if smi:
            cmd = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"-lms={self.interval_ms}"]
            self.proc = procs.stream(cmd)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()) / 100)
            except ValueError:
                pass

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            procs.stop(self.proc)
            self._reader.join(timeout=2)

    @property
    def mean(self) -> float | None:
        # the first sample can predate the run (nvidia-smi reports the last period): drop it
        xs = self.samples[1:] or self.samples
        return round(sum(xs) / len(xs), 3) if xs else None
