"""Turbo's meanflow S3Gen on the CPU: loading, the time wiring, and chunked streaming decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chatterbox_sidecar.engines.chatterbox.conditionals import VoiceConditionals
from chatterbox_sidecar.engines.chatterbox.s3gen.stream import (
    SAMPLES_PER_TOKEN,
    Reference,
    S3GenStreamDecoder,
    StreamConfig,
)
from chatterbox_sidecar.engines.chatterbox.turbo.s3gen import load_meanflow_s3gen

pytestmark = pytest.mark.torch

N_TOKENS = 60
CONFIG = StreamConfig(chunk_size=12, first_chunk_size=8, context_window=50, flow_steps=2)


@pytest.fixture(scope="module")
def reference(meanflow_model_dir) -> Reference:
    conds = VoiceConditionals.load(meanflow_model_dir / "conds.pt")
    return Reference.from_gen(conds.gen, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def decoder(meanflow_model) -> S3GenStreamDecoder:
    return S3GenStreamDecoder(meanflow_model, CONFIG)


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    return torch.randint(0, 6561, (N_TOKENS,), generator=torch.Generator().manual_seed(5)).tolist()


def test_an_original_s3gen_file_is_refused(s3gen_model_dir):
    with pytest.raises(ValueError, match="not a meanflow S3Gen checkpoint"):
        load_meanflow_s3gen(s3gen_model_dir / "s3gen.safetensors")


def test_estimator_mixes_start_and_end_time_embeddings(meanflow_model, s3gen_model):
    """With the mixer set to pick one half, the meanflow estimator is the plain one at t or r.

    (Both files hold the same S3Gen weights; only the mixer is Turbo's.)
    """
    estimator = meanflow_model.flow.decoder.estimator
    plain = s3gen_model.flow.decoder.estimator
    g = torch.Generator().manual_seed(0)
    x, mu, cond = (torch.randn(2, 80, 40, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 40)
    spks = torch.randn(2, 80, generator=g)
    t, r = torch.tensor([0.0, 0.5]), torch.tensor([0.5, 1.0])
    mixer = estimator.time_mlp.mixer.weight
    saved = mixer.detach().clone()
    dim = mixer.shape[0]
    try:
        with torch.inference_mode():
            for half, times in ((0, t), (1, r)):
                mixer.zero_()
                mixer[:, half * dim : (half + 1) * dim] = torch.eye(dim)
                ours = estimator(x, mask, mu, torch.cat([t, r]), spks, cond)
                torch.testing.assert_close(ours, plain(x, mask, mu, times, spks, cond))
    finally:
        with torch.no_grad():
            mixer.copy_(saved)


def test_meanflow_solves_on_a_linear_schedule_without_guidance_rows(decoder, reference, tokens):
    assert decoder.meanflow
    torch.testing.assert_close(decoder._t_span, torch.tensor([0.0, 0.5, 1.0]))
    calls = []
    original = decoder._estimator

    def spy(x, mask, mu, t, spks, cond):
        calls.append((x.shape[0], t.tolist()))
        return original(x, mask, mu, t, spks, cond)

    decoder._estimator = spy
    try:
        decoder._flow_mel(reference, tokens, 0, finalize=True)
    finally:
        decoder._estimator = original
    # two steps, one row each (no unconditional twin), times (start, end) stacked
    assert calls == [(1, [0.0, 0.5]), (1, [0.5, 1.0])]


def test_streamed_meanflow_audio_equals_whole_decode(decoder, reference, tokens):
    whole = decoder.decode_whole(reference, tokens)
    assert len(whole) == N_TOKENS * SAMPLES_PER_TOKEN
    assert np.isfinite(whole).all() and np.abs(whole).max() > 0.01
    np.testing.assert_array_equal(decoder.decode_whole(reference, tokens), whole)
    stream = decoder.new_stream(reference)
    chunks = []
    for token in tokens:
        stream.push([token])
        while stream.ready(CONFIG):
            chunks.append(decoder.decode_chunk(stream, finalize=False))
    chunks.append(decoder.decode_chunk(stream, finalize=True))
    audio = np.concatenate(chunks)
    assert len(chunks) > 2 and len(audio) == len(whole)
    rel = np.sqrt(np.mean((audio - whole) ** 2) / np.mean(whole**2))
    assert rel < 0.03


def test_meanflow_chunks_batch_like_separate_decodes(decoder, reference, tokens):
    """Two streams' chunks in one batch give what each gives alone."""
    other = tokens[::-1]
    alone = [decoder.decode_whole(reference, t[:30]) for t in (tokens, other)]
    streams = []
    for t in (tokens, other):
        s = decoder.new_stream(reference)
        s.push(t[:30])
        streams.append(s)
    together = decoder.decode_chunks(streams, [True, True])
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
