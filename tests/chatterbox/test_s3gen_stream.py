"""Streaming S3Gen decoding vs whole-utterance decoding, on CPU with random full-size weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chatterbox_sidecar.engines.chatterbox.conditionals import VoiceConditionals
from chatterbox_sidecar.engines.chatterbox.s3gen.stream import (
    MEL_CACHE_FRAMES,
    SAMPLES_PER_TOKEN,
    SOURCE_CACHE_SAMPLES,
    Reference,
    S3GenStreamDecoder,
    StreamConfig,
)

pytestmark = pytest.mark.torch

N_TOKENS = 60
CONFIG = StreamConfig(chunk_size=12, first_chunk_size=8, context_window=50, flow_steps=2)


@pytest.fixture(scope="module")
def reference(s3gen_model_dir) -> Reference:
    conds = VoiceConditionals.load(s3gen_model_dir / "conds.pt")
    return Reference.from_gen(conds.gen, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def decoder(s3gen_model) -> S3GenStreamDecoder:
    return S3GenStreamDecoder(s3gen_model, CONFIG)


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 6561, (N_TOKENS,), generator=g).tolist()


@pytest.fixture(scope="module")
def whole(decoder, reference, tokens) -> np.ndarray:
    return decoder.decode_whole(reference, tokens)


@pytest.fixture(scope="module")
def streamed(decoder, reference, tokens) -> list[np.ndarray]:
    """Tokens arrive one at a time, as T3 deltas do; chunks decode as soon as they are ready."""
    stream = decoder.new_stream(reference)
    chunks = []
    for token in tokens:
        stream.push([token])
        while stream.ready(CONFIG):
            chunks.append(decoder.decode_chunk(stream, finalize=False))
    chunks.append(decoder.decode_chunk(stream, finalize=True))
    assert stream.finished
    return chunks


def seams(chunks: list[np.ndarray]) -> np.ndarray:
    return np.cumsum([len(c) for c in chunks])[:-1]


def test_whole_decode_matches_upstream_flow(decoder, reference, tokens, s3gen_model):
    """Our flow (own Euler/CFG loop, noise by position) equals upstream's flow_inference."""
    s3gen_model.flow.decoder.rand_noise = decoder.flow_noise  # upstream's buffer := ours
    ref_dict = {
        "prompt_token": reference.prompt_token,
        "prompt_token_len": torch.tensor([reference.prompt_token.shape[1]]),
        "prompt_feat": reference.prompt_feat,
        "prompt_feat_len": None,
        "embedding": reference.embedding,
    }
    upstream = s3gen_model.flow_inference(
        torch.tensor(tokens)[None], ref_dict=ref_dict, finalize=True, n_timesteps=CONFIG.flow_steps
    )
    ours = decoder._flow_mel(reference, tokens, 0, finalize=True)
    assert ours.shape == upstream.shape == (1, 80, 2 * N_TOKENS)
    torch.testing.assert_close(ours, upstream, rtol=1e-4, atol=1e-4)


def test_audio_length_is_960_samples_per_token(whole, streamed):
    assert len(whole) == N_TOKENS * SAMPLES_PER_TOKEN
    assert sum(len(c) for c in streamed) == N_TOKENS * SAMPLES_PER_TOKEN
    assert np.isfinite(whole).all() and np.abs(whole).max() > 0.01


def test_chunk_schedule(streamed):
    """Hops grow (8, 12, 24 new tokens here); the final chunk takes what is left (16)."""
    hops = [CONFIG.hop_cap(k) for k in range(3)]
    assert hops == [8, 12, 24] and sum(hops) + 48 + 3 > N_TOKENS  # the 4th hop never fills
    # first chunk: 8 new tokens (+ 3 lookahead), minus the 8 frames held for the cross-fade
    assert len(streamed[0]) == 8 * SAMPLES_PER_TOKEN - SOURCE_CACHE_SAMPLES
    # middle chunks: their hop, the held-back tail of the previous one paid out
    assert [len(c) for c in streamed[1:-1]] == [h * SAMPLES_PER_TOKEN for h in hops[1:]]
    final = (N_TOKENS - sum(hops)) * SAMPLES_PER_TOKEN + SOURCE_CACHE_SAMPLES
    assert len(streamed[-1]) == final


def test_decoding_is_deterministic(decoder, reference, tokens, whole):
    """Same tokens, same voice: the same audio (flow noise and vocoder source by position)."""
    np.testing.assert_array_equal(decoder.decode_whole(reference, tokens), whole)


def test_streamed_equals_whole_away_from_seams(whole, streamed):
    audio = np.concatenate(streamed)
    bounds = seams(streamed)
    away = np.ones(len(audio), dtype=bool)
    for b in bounds:  # the cross-faded overlap and the vocoder's edge before it
        away[max(0, b - SOURCE_CACHE_SAMPLES) : b + SOURCE_CACHE_SAMPLES] = False
    assert away.sum() > len(audio) // 4
    err = audio[away] - whole[away]
    signal_rms = np.sqrt(np.mean(whole[away] ** 2))
    rel = np.sqrt(np.mean(err**2)) / signal_rms
    assert rel < 0.03, f"streamed differs from whole by {rel:.3f} of the signal away from seams"
    # Sensitivity: the same comparison with audio one mel frame late is far off.
    shifted = np.roll(whole, 480)[away]
    assert np.sqrt(np.mean((shifted - whole[away]) ** 2)) / signal_rms > 10 * rel


def test_streamed_close_to_whole_everywhere(whole, streamed):
    audio = np.concatenate(streamed)
    rel = np.sqrt(np.mean((audio - whole) ** 2) / np.mean(whole**2))
    assert rel < 0.03


def test_no_step_at_seams(whole, streamed):
    """Across a seam, consecutive samples change no more than the signal's own changes do."""
    audio = np.concatenate(streamed)
    own_steps = np.abs(np.diff(whole))
    limit = np.percentile(own_steps, 99.9)
    for b in seams(streamed):
        step = abs(float(audio[b]) - float(audio[b - 1]))
        assert step <= limit, f"step {step:.4f} at seam {b} > {limit:.4f}"
        # and it is the step the whole decode has there, give or take
        assert abs(step - abs(float(whole[b]) - float(whole[b - 1]))) < 0.25 * limit


def test_redecoded_context_frames_match_emitted_frames(decoder, reference, tokens):
    """A frame decoded again as left context starts from the noise it started from before."""
    first = decoder._flow_mel(reference, tokens[:20], 0, finalize=False)  # frames of tokens 0..16
    again = decoder._flow_mel(reference, tokens[4:40], 4, finalize=False)  # tokens 4.. as context
    emitted = first[:, :, 8 : 2 * 17]  # tokens 4..16
    redecoded = again[:, :, : 2 * 13]
    rel = float((redecoded - emitted).norm() / emitted.norm())
    # The flow attends over its whole window, so a different window moves every frame a little
    # (with random weights ~20-30 %); the noise is what must not move.
    wrong = decoder._flow_mel(reference, tokens[4:40], 0, finalize=False)[:, :, : 2 * 13]
    wrong_rel = float((wrong - emitted).norm() / emitted.norm())
    print(f"re-decoded frames differ by {rel:.3f}; with noise of other positions {wrong_rel:.3f}")
    assert rel < 0.5
    assert wrong_rel > 2 * rel


def test_invalid_tokens_never_reach_s3gen(decoder, reference, tokens):
    stream = decoder.new_stream(reference)
    kept = stream.push([tokens[0], 6561, 6562, 8193, -1, tokens[1], 9062])
    assert kept == 2 and stream.tokens == tokens[:2]
    dirty = [t for pair in zip(tokens[:20], [6562] * 20, strict=True) for t in pair] + [6561]
    np.testing.assert_array_equal(
        decoder.decode_whole(reference, dirty), decoder.decode_whole(reference, tokens[:20])
    )


def test_short_utterances(decoder, reference, tokens):
    assert len(decoder.decode_whole(reference, [])) == 0
    assert len(decoder.decode_whole(reference, tokens[:2])) == 2 * SAMPLES_PER_TOKEN
    stream = decoder.new_stream(reference)
    stream.push(tokens[:5])
    assert not stream.ready(CONFIG)
    assert len(decoder.decode_chunk(stream, finalize=True)) == 5 * SAMPLES_PER_TOKEN


def test_config_floor():
    with pytest.raises(ValueError):
        StreamConfig(first_chunk_size=6)
    assert StreamConfig(first_chunk_size=7).first_chunk_size == 7
    assert MEL_CACHE_FRAMES == 8
