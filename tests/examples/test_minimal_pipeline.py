"""``examples/minimal_pipeline.py`` against a real piper sidecar: the WAV says the sentences."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import soundfile as sf

from tests.asr import transcribe, word_error_rate
from tests.conftest import ROOT

SCRIPT = ROOT / "examples" / "minimal_pipeline.py"


def test_minimal_pipeline_writes_the_spoken_sentences(sidecar, tmp_path: Path):
    out = tmp_path / "out.wav"
    sentences = ["The weather is lovely today.", "Thank you for calling us."]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--url", sidecar.url, "--sample-rate", "16000"]
        + ["--out", str(out), *sentences],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    audio, rate = sf.read(out, dtype="int16")
    assert rate == 16000
    assert audio.ndim == 1
    assert 1.5 < len(audio) / rate < 10
    text = transcribe(audio, rate)
    assert word_error_rate(" ".join(sentences), text) <= 0.25, text
