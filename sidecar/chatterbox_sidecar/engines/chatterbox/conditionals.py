"""Voice conditionals: what T3 and S3Gen need of a voice, computed once and cached as conds.pt.

The file format is upstream Chatterbox's ``Conditionals.save``::

    torch.save({
        "t3": {speaker_emb, clap_emb, cond_prompt_speech_tokens, cond_prompt_speech_emb,
               emotion_adv},
        "gen": {prompt_token, prompt_token_len, prompt_feat, prompt_feat_len, embedding},
    })

so the model's own ``conds.pt`` and ours are interchangeable, and it is loaded with
``weights_only=True``.

Computed from a reference WAV as upstream's ``prepare_conditionals`` does, with soxr (the
resampler behind librosa's default ``soxr_hq``) for the 24 kHz and 16 kHz copies: the first
10 s at 24 kHz go to ``S3Gen.embed_ref`` (prompt tokens, prompt mel, x-vector), the first 6 s at
16 kHz to the S3 tokenizer whose weights live in ``s3gen.safetensors`` (at most 150 tokens, T3's
speech prompt), and the whole clip at 16 kHz to the voice encoder (``ve.safetensors``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import torch
from loguru import logger

from chatterbox_sidecar.voices import atomic_write

S3GEN_SR = 24_000
S3_SR = 16_000
T3_KEYS = (
    "speaker_emb",
    "clap_emb",
    "cond_prompt_speech_tokens",
    "cond_prompt_speech_emb",
    "emotion_adv",
)
# The voice encoder's silence threshold (upstream calls it with librosa's trim at 20 dB).
VE_TRIM_TOP_DB = 20.0
GEN_KEYS = ("prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding")


@dataclass(frozen=True)
class ConditioningConfig:
    """How much of a reference clip conditions each model.

    Parameters:
        s3gen_reference_seconds: Seconds of reference S3Gen is prompted with (upstream: 10).
            Every chunk re-processes this prompt, so a shorter one makes S3Gen cheaper.
        t3_reference_seconds: Seconds of reference tokenized for T3's speech prompt (upstream: 6).
        t3_prompt_tokens: Most speech tokens in T3's prompt (upstream: 150).
        exaggeration: Emotion value stored in ``emotion_adv`` (requests override it).
        loudness_lufs: Integrated loudness the reference is scaled to before anything reads
            it (upstream Turbo: -27 LUFS), or None to keep its level (the Original).
    """

    s3gen_reference_seconds: float = 10.0
    t3_reference_seconds: float = 6.0
    t3_prompt_tokens: int = 150
    exaggeration: float = 0.5
    loudness_lufs: float | None = None

    def __post_init__(self) -> None:
        """Reject caps that leave no audio."""
        if self.s3gen_reference_seconds <= 0 or self.t3_reference_seconds <= 0:
            raise ValueError("reference caps must be positive")
        if self.t3_prompt_tokens < 1:
            raise ValueError("t3_prompt_tokens must be >= 1")


@dataclass
class VoiceConditionals:
    """A voice's conditionals in upstream's layout.

    Parameters:
        t3: T3 conditioning (``speaker_emb`` (1, 256), ``cond_prompt_speech_tokens`` (1, <=150),
            ``emotion_adv`` (1, 1, 1); ``clap_emb`` and ``cond_prompt_speech_emb`` usually None).
        gen: S3Gen reference (``prompt_token`` (1, P), ``prompt_token_len`` (1,),
            ``prompt_feat`` (1, 2P, 80), ``prompt_feat_len`` None, ``embedding`` (1, 192)).
    """

    t3: dict[str, Any]
    gen: dict[str, Any]

    def to(self, device: torch.device | str) -> VoiceConditionals:
        """Returns: a copy with every tensor on ``device``."""
        move = _mover(device)
        return VoiceConditionals(
            {k: move(v) for k, v in self.t3.items()}, {k: move(v) for k, v in self.gen.items()}
        )

    def to_bytes(self) -> bytes:
        """Returns: the ``conds.pt`` file content (tensors on the CPU)."""
        cpu = self.to("cpu")
        buf = io.BytesIO()
        torch.save({"t3": dict(cpu.t3), "gen": dict(cpu.gen)}, buf)
        return buf.getvalue()

    def save(self, path: Path) -> None:
        """Write ``conds.pt`` atomically.

        Args:
            path: Destination file.
        """
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> VoiceConditionals:
        """Read a ``conds.pt`` (ours or the model's own), tensors only.

        Args:
            path: The file.
            device: Where to put the tensors.

        Returns:
            The conditionals.

        Raises:
            ValueError: If the file is not in upstream's layout.
            OSError: If it cannot be read.
        """
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or not {"t3", "gen"} <= data.keys():
            raise ValueError(f"{path} is not a Chatterbox conds.pt (no 't3'/'gen' sections)")
        t3, gen = dict(data["t3"]), dict(data["gen"])
        required = (
            (t3, ("speaker_emb", "cond_prompt_speech_tokens"), "t3"),
            (gen, ("prompt_token", "prompt_feat", "embedding"), "gen"),
        )
        for section, keys, name in required:
            missing = [k for k in keys if section.get(k) is None]
            if missing:
                raise ValueError(f"{path}: '{name}' lacks {', '.join(missing)}")
        return cls(t3, gen).to(device)


def _mover(device: torch.device | str):
    def move(v: Any) -> Any:
        return v.to(device) if torch.is_tensor(v) else v

    return move


def read_reference(path: Path) -> tuple[np.ndarray, int]:
    """Read a reference WAV as float32 mono.

    Args:
        path: The file.

    Returns:
        The samples and their rate.
    """
    wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return np.ascontiguousarray(wav.mean(axis=1), dtype=np.float32), int(sr)


def resample(wav: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Resample with soxr (high quality), as librosa's default does.

    Args:
        wav: Float32 mono samples.
        src: Their rate.
        dst: The wanted rate.

    Returns:
        Float32 samples at ``dst``.
    """
    if src == dst:
        return wav.astype(np.float32, copy=False)
    return soxr.resample(wav, src, dst, quality="HQ").astype(np.float32, copy=False)


def normalize_loudness(wav: np.ndarray, sample_rate: int, lufs: float) -> np.ndarray:
    """Scale ``wav`` to an integrated loudness of ``lufs`` (ITU-R BS.1770, ``pyloudnorm``).

    As upstream Turbo does, a clip whose loudness cannot be measured (shorter than one 400 ms
    gating block, or silent) is returned unchanged, with a warning.

    Args:
        wav: Float32 mono samples.
        sample_rate: Their rate.
        lufs: Target loudness.

    Returns:
        The scaled samples (float32).
    """
    import pyloudnorm

    try:
        loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(wav.astype(np.float64))
    except ValueError as e:  # shorter than one gating block
        logger.warning(f"Reference loudness not normalised: {e}")
        return wav
    gain = 10.0 ** ((lufs - loudness) / 20.0)
    if not np.isfinite(gain) or gain <= 0.0:
        logger.warning(f"Reference loudness not normalised: measured {loudness} LUFS")
        return wav
    return (wav * gain).astype(np.float32)


def trim_silence(
    wav: np.ndarray, top_db: float, frame_length: int = 2048, hop_length: int = 512
) -> np.ndarray:
    """Cut leading and trailing silence as ``librosa.effects.trim`` does (same result).

    Frames (centred, zero-padded) whose mean power is more than ``top_db`` below the loudest
    frame's are silent; the kept span runs from the first loud frame's start to the last loud
    frame's end.

    Args:
        wav: Float32 mono samples.
        top_db: Threshold below the peak frame power, in dB.
        frame_length: Samples per analysis frame.
        hop_length: Samples between frames.

    Returns:
        The trimmed samples (empty if every frame is silent).
    """
    padded = np.pad(wav, frame_length // 2)
    if len(padded) < frame_length:
        return wav[:0]
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame_length)[::hop_length]
    power = np.mean(np.abs(frames) ** 2, axis=1)
    amin = 1e-10
    db = 10 * np.log10(np.maximum(amin, power)) - 10 * np.log10(max(amin, float(power.max())))
    loud = np.flatnonzero(db > -top_db)
    if len(loud) == 0:
        return wav[:0]
    start = int(loud[0]) * hop_length
    end = min(len(wav), (int(loud[-1]) + 1) * hop_length)
    return wav[start:end]


@torch.inference_mode()
def compute_conditionals(
    wav: np.ndarray,
    sample_rate: int,
    s3gen: torch.nn.Module,
    voice_encoder: torch.nn.Module,
    config: ConditioningConfig | None = None,
) -> VoiceConditionals:
    """Compute a voice's conditionals from reference audio.

    Args:
        wav: Float32 mono reference samples.
        sample_rate: Their rate.
        s3gen: The loaded S3Gen (its tokenizer, CAMPPlus and mel extractor are used).
        voice_encoder: The loaded voice encoder.
        config: Reference caps; defaults to upstream's.

    Returns:
        The conditionals, on the CPU.
    """
    config = config or ConditioningConfig()
    wav24 = resample(wav, sample_rate, S3GEN_SR)
    if config.loudness_lufs is not None:
        wav24 = normalize_loudness(wav24, S3GEN_SR, config.loudness_lufs)
    wav16 = resample(wav24, S3GEN_SR, S3_SR)

    ref24 = wav24[: int(config.s3gen_reference_seconds * S3GEN_SR)]
    gen = s3gen.embed_ref(torch.from_numpy(ref24.copy()), S3GEN_SR)

    enc16 = wav16[: int(config.t3_reference_seconds * S3_SR)]
    tokens, _ = s3gen.tokenizer.forward([enc16], max_len=config.t3_prompt_tokens)
    tokens = torch.atleast_2d(tokens)[:, : config.t3_prompt_tokens]

    # Trimmed here, not by the encoder's own librosa.effects.trim: importing that pulls in
    # librosa.feature, whose numba functions compile for ~35 s on first use (the H200 machine,
    # benchmarks/NOTES.md, issue 13): the first registration of every process would wait.
    ve = voice_encoder.embeds_from_wavs(
        [trim_silence(wav16, VE_TRIM_TOP_DB)], sample_rate=S3_SR, trim_top_db=None
    )
    speaker_emb = torch.from_numpy(np.asarray(ve)).float().mean(dim=0, keepdim=True)

    t3 = {
        "speaker_emb": speaker_emb,
        "clap_emb": None,
        "cond_prompt_speech_tokens": tokens.long(),
        "cond_prompt_speech_emb": None,
        "emotion_adv": config.exaggeration * torch.ones(1, 1, 1),
    }
    gen = {k: gen.get(k) for k in GEN_KEYS}
    logger.debug(
        f"Conditionals: {tokens.shape[1]} T3 prompt tokens, "
        f"{gen['prompt_token'].shape[1]} S3Gen prompt tokens"
    )
    return VoiceConditionals(t3, gen).to("cpu")


def compute_conditionals_from_file(
    path: Path,
    s3gen: torch.nn.Module,
    voice_encoder: torch.nn.Module,
    config: ConditioningConfig | None = None,
) -> VoiceConditionals:
    """Compute conditionals from a reference WAV file (see :func:`compute_conditionals`).

    Args:
        path: The WAV file.
        s3gen: The loaded S3Gen.
        voice_encoder: The loaded voice encoder.
        config: Reference caps.

    Returns:
        The conditionals, on the CPU.
    """
    wav, sr = read_reference(path)
    return compute_conditionals(wav, sr, s3gen, voice_encoder, config)


def cap_reference(gen: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Shorten an S3Gen reference (for example the model's own) to its first ``seconds``.

    Args:
        gen: A ``gen`` dict.
        seconds: The cap.

    Returns:
        A new dict whose prompt covers at most ``seconds`` (25 tokens, 50 mel frames a second).
    """
    tokens = int(seconds * 25)
    out = dict(gen)
    pt = gen["prompt_token"]
    if pt.shape[-1] <= tokens:
        return out
    out["prompt_token"] = pt[..., :tokens]
    out["prompt_token_len"] = torch.tensor([tokens], dtype=torch.long)
    out["prompt_feat"] = gen["prompt_feat"][:, : 2 * tokens]
    return out
