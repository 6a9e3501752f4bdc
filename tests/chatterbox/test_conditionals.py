"""Voice conditionals from a WAV with the real S3Gen and VE code, saved as conds.pt, reloaded."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from chatterbox_sidecar.engines.chatterbox.conditionals import (
    VE_TRIM_TOP_DB,
    ConditioningConfig,
    VoiceConditionals,
    cap_reference,
    compute_conditionals,
    compute_conditionals_from_file,
    normalize_loudness,
    read_reference,
    resample,
    trim_silence,
)

pytestmark = pytest.mark.torch


def voice_like(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    """A voiced-speech-like test signal: a gliding harmonic tone with syllable envelopes."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    tone = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    return (0.2 * tone * envelope + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def stereo_wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "reference.wav"
    left = voice_like(8.0, 44_100, seed=1)
    sf.write(path, np.stack([left, 0.5 * left], axis=1), 44_100, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def conds(stereo_wav, s3gen_model, voice_encoder) -> VoiceConditionals:
    return compute_conditionals_from_file(stereo_wav, s3gen_model, voice_encoder)


def test_shapes_follow_upstream(conds):
    t3, gen = conds.t3, conds.gen
    assert set(t3) == {
        "speaker_emb",
        "clap_emb",
        "cond_prompt_speech_tokens",
        "cond_prompt_speech_emb",
        "emotion_adv",
    }
    assert set(gen) == {
        "prompt_token",
        "prompt_token_len",
        "prompt_feat",
        "prompt_feat_len",
        "embedding",
    }
    assert t3["speaker_emb"].shape == (1, 256)
    # first 6 s at 16 kHz -> 150 tokens (the cap)
    assert t3["cond_prompt_speech_tokens"].shape == (1, 150)
    assert t3["cond_prompt_speech_tokens"].dtype == torch.long
    assert t3["emotion_adv"].shape == (1, 1, 1)
    assert t3["clap_emb"] is None and t3["cond_prompt_speech_emb"] is None
    # all 8 s (< the 10 s cap) at 24 kHz -> 200 tokens, 400 mel frames
    assert gen["prompt_token"].shape == (1, 200)
    assert int(gen["prompt_token_len"][0]) == 200
    assert gen["prompt_feat"].shape == (1, 400, 80)
    assert gen["embedding"].shape == (1, 192)
    assert int(gen["prompt_token"].max()) < 6561
    for v in (*t3.values(), *gen.values()):
        assert v is None or (v.device.type == "cpu" and torch.isfinite(v.float()).all())


def test_save_and_reload_equal(conds, tmp_path):
    path = tmp_path / "conds.pt"
    conds.save(path)
    raw = torch.load(path, weights_only=True)  # upstream's loader reads it the same way
    assert set(raw) == {"t3", "gen"}
    again = VoiceConditionals.load(path)
    for section in ("t3", "gen"):
        a, b = getattr(conds, section), getattr(again, section)
        assert a.keys() == b.keys()
        for k in a:
            if a[k] is None:
                assert b[k] is None
            else:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_deterministic_and_audio_dependent(conds, stereo_wav, s3gen_model, voice_encoder):
    wav, sr = read_reference(stereo_wav)
    same = compute_conditionals(wav, sr, s3gen_model, voice_encoder)
    torch.testing.assert_close(same.gen["prompt_feat"], conds.gen["prompt_feat"])
    assert torch.equal(same.t3["cond_prompt_speech_tokens"], conds.t3["cond_prompt_speech_tokens"])
    other = compute_conditionals(voice_like(8.0, sr, seed=7) * 0.3, sr, s3gen_model, voice_encoder)
    assert not torch.allclose(other.gen["prompt_feat"], conds.gen["prompt_feat"])


def test_reference_caps(stereo_wav, s3gen_model, voice_encoder):
    capped = compute_conditionals_from_file(
        stereo_wav,
        s3gen_model,
        voice_encoder,
        ConditioningConfig(s3gen_reference_seconds=3.0, t3_reference_seconds=2.0),
    )
    assert capped.gen["prompt_token"].shape == (1, 75)
    assert capped.gen["prompt_feat"].shape == (1, 150, 80)
    assert capped.t3["cond_prompt_speech_tokens"].shape == (1, 50)


def test_cap_reference_trims_a_stored_reference(conds):
    gen = cap_reference(conds.gen, 2.0)
    assert gen["prompt_token"].shape == (1, 50) and gen["prompt_feat"].shape == (1, 100, 80)
    assert torch.equal(gen["prompt_token"], conds.gen["prompt_token"][:, :50])
    assert cap_reference(conds.gen, 30.0)["prompt_token"].shape == (1, 200)


def test_resampling_is_soxr_and_keeps_a_tone():
    sr = 44_100
    tone = np.sin(2 * np.pi * 440 * np.arange(sr) / sr).astype(np.float32)
    out = resample(tone, sr, 24_000)
    assert out.dtype == np.float32 and len(out) == 24_000
    spectrum = np.abs(np.fft.rfft(out[2400:-2400]))
    peak_hz = np.argmax(spectrum) * 24_000 / len(out[2400:-2400])
    assert abs(peak_hz - 440) < 2


def test_model_conds_file_loads(s3gen_model_dir):
    conds = VoiceConditionals.load(s3gen_model_dir / "conds.pt")
    assert conds.t3["speaker_emb"].shape == (1, 256)
    assert conds.gen["prompt_feat"].shape[1] == 2 * conds.gen["prompt_token"].shape[1]


def test_bad_files_are_rejected(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError):
        VoiceConditionals.load(missing)
    wrong = tmp_path / "wrong.pt"
    torch.save({"t3": {}, "gen": {}}, wrong)
    with pytest.raises(ValueError):
        VoiceConditionals.load(wrong)
    unsafe = tmp_path / "unsafe.pt"
    unsafe.write_bytes(pickle.dumps({"t3": object()}))
    with pytest.raises(Exception):  # noqa: B017 - weights_only refuses arbitrary pickles
        VoiceConditionals.load(unsafe)


@pytest.mark.parametrize(
    "case", ["tone_in_silence", "noise_floor", "all_silent", "short", "loud_edges"]
)
def test_trim_silence_matches_librosa(case):
    librosa = pytest.importorskip("librosa")
    rng = np.random.default_rng(3)
    sr = 16_000
    t = np.arange(sr * 3) / sr
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    if case == "tone_in_silence":
        wav = np.concatenate([np.zeros(7_001), tone, np.zeros(12_345)]).astype(np.float32)
    elif case == "noise_floor":  # silence that is quiet noise, 40 dB down
        floor = (0.003 * rng.standard_normal(9_000)).astype(np.float32)
        wav = np.concatenate([floor, tone, floor]).astype(np.float32)
    elif case == "all_silent":
        wav = np.zeros(20_000, dtype=np.float32)
    elif case == "short":
        wav = tone[:700]
    else:
        wav = tone
    want, _ = librosa.effects.trim(wav, top_db=VE_TRIM_TOP_DB)
    got = trim_silence(wav, VE_TRIM_TOP_DB)
    assert len(got) == len(want)
    np.testing.assert_array_equal(got, want)
    if case == "tone_in_silence":  # and it did cut the silence
        assert 3 * sr <= len(got) < len(wav) - 15_000


def test_loudness_is_normalised_to_the_target():
    import pyloudnorm

    meter = pyloudnorm.Meter(24_000)
    clip = voice_like(4.0, 24_000, seed=3)
    for gain in (0.05, 1.0, 3.0):
        out = normalize_loudness(clip * gain, 24_000, -27.0)
        assert out.dtype == np.float32
        assert meter.integrated_loudness(out.astype(np.float64)) == pytest.approx(-27.0, abs=0.05)
    short = clip[:2400]  # 0.1 s: shorter than one 400 ms gating block
    assert np.array_equal(normalize_loudness(short, 24_000, -27.0), short)
    silent = np.zeros(24_000, dtype=np.float32)
    assert np.array_equal(normalize_loudness(silent, 24_000, -27.0), silent)


def test_turbo_conditioning_does_not_depend_on_the_reference_level(s3gen_model, voice_encoder):
    wav = voice_like(6.0, 24_000, seed=4)
    turbo = ConditioningConfig(loudness_lufs=-27.0)
    loud = compute_conditionals(wav, 24_000, s3gen_model, voice_encoder, turbo)
    quiet = compute_conditionals(0.2 * wav, 24_000, s3gen_model, voice_encoder, turbo)
    torch.testing.assert_close(quiet.gen["prompt_feat"], loud.gen["prompt_feat"])
    torch.testing.assert_close(quiet.t3["speaker_emb"], loud.t3["speaker_emb"])
    kept = compute_conditionals(0.2 * wav, 24_000, s3gen_model, voice_encoder)
    assert not torch.allclose(kept.gen["prompt_feat"], loud.gen["prompt_feat"], atol=1e-3)
