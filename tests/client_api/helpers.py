"""Shared by the client and CLI tests."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf


def reference_wav(seconds: float = 4.0, rate: int = 16000) -> bytes:
    """A valid mono WAV (a voiced-like tone with a little noise) for voice registration."""
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    signal += 0.01 * np.random.default_rng(0).standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, signal.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


LONG_TEXT = " ".join(
    f"This is sentence number {i} of a long story that keeps the engine busy for a while."
    for i in range(1, 25)
)
