"""Samples how busy the GPU is (``nvidia-smi``'s utilization: share of time a kernel ran)."""

from __future__ import annotations

import subprocess
import threading
import time


class GpuSampler:
    """Reads ``nvidia-smi`` utilization every ``period_ms`` in a background thread.

    Args:
        period_ms: Sampling period.
    """

    def __init__(self, period_ms: int = 500):
        self.period_ms = period_ms
        self.samples: list[tuple[float, float]] = []  # (epoch seconds, utilization %)
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> GpuSampler:
        try:
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    str(self.period_ms),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append((time.time(), float(line.strip().split(",")[0])))
            except ValueError:
                continue

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(5)

    def window(self, start: float, end: float) -> dict:
        """Mean utilization and the share of samples under 20 % between two epoch times."""
        values = [u for t, u in self.samples if start <= t <= end]
        if not values:
            return {"gpu_busy_mean_pct": None, "gpu_samples": 0}
        return {
            "gpu_busy_mean_pct": round(sum(values) / len(values), 1),
            "gpu_busy_under_20pct_share": round(sum(v < 20 for v in values) / len(values), 3),
            "gpu_samples": len(values),
        }
