"""Wire encodings and streaming resampling."""

from __future__ import annotations

import audioop

import numpy as np
import pytest
from chatterbox_sidecar.audio import StreamEncoder, encode_samples, float_to_s16, resample


def _signal(n: int, rate: int) -> np.ndarray:
    t = np.arange(n) / rate
    return (0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t)).astype(
        np.float32
    )


def test_s16_clips_and_rounds():
    out = float_to_s16(np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], dtype=np.float32))
    assert out.tolist() == [-32767, -32767, 0, 16384, 32767, 32767]


def test_mulaw_round_trips_within_g711_error():
    audio = _signal(8000, 8000)
    encoded = encode_samples(audio, "pcm_mulaw")
    assert len(encoded) == len(audio)
    decoded = np.frombuffer(audioop.ulaw2lin(encoded, 2), dtype="<i2") / 32768.0
    # G.711 μ-law keeps about 2-3% relative error on a loud signal
    assert np.max(np.abs(decoded - audio)) < 0.02


@pytest.mark.parametrize("out_rate", [8000, 16000, 24000, 44100, 48000])
def test_streamed_resampling_equals_whole_signal(out_rate):
    rate = 22050
    audio = _signal(rate * 2, rate)
    whole = resample(audio, rate, out_rate)
    enc = StreamEncoder(rate, out_rate, "pcm_f32le")
    pieces = [enc.encode(c) for c in np.array_split(audio, [1000, 1001, 7000, 20000, 30011])]
    pieces.append(enc.flush())
    streamed = np.frombuffer(b"".join(pieces), dtype="<f4")
    assert enc.samples_out == len(streamed)
    assert abs(len(streamed) - len(whole)) <= 1
    n = min(len(streamed), len(whole))
    assert np.max(np.abs(streamed[:n] - whole[:n])) < 1e-3
    assert enc.seconds_out == pytest.approx(len(audio) / rate, abs=2 / out_rate)


def test_encoder_without_resampling_passes_samples_through():
    audio = _signal(1000, 24000)
    enc = StreamEncoder(24000, 24000, "pcm_s16le")
    data = enc.encode(audio) + enc.flush()
    assert np.array_equal(np.frombuffer(data, "<i2"), float_to_s16(audio))


def test_unknown_encoding_is_refused():
    with pytest.raises(ValueError):
        StreamEncoder(24000, 24000, "mp3")
