"""Audio conversion for the wire: resampling and the protocol's encodings.

The engines produce float32 mono audio at their native rate; each context's client asks for a
rate and an encoding. :class:`StreamEncoder` turns one into the other chunk by chunk.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import soundfile as sf
import soxr

with warnings.catch_warnings():
    # audioop is deprecated in 3.11-3.12 and comes from the audioop-lts package on 3.13+; it is
    # what Pipecat itself uses for G.711, so the sidecar's μ-law matches the plugin side exactly.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

BYTES_PER_SAMPLE = {"pcm_f32le": 4, "pcm_s16le": 2, "pcm_mulaw": 1}


def float_to_s16(audio: np.ndarray) -> np.ndarray:
    """Convert float audio in [-1, 1] to int16, clipping out-of-range samples.

    Args:
        audio: Float samples.

    Returns:
        The int16 samples.
    """
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")


def encode_samples(audio: np.ndarray, encoding: str) -> bytes:
    """Encode float32 samples in one of the protocol's encodings.

    Args:
        audio: Float32 mono samples in [-1, 1].
        encoding: ``pcm_f32le``, ``pcm_s16le`` or ``pcm_mulaw``.

    Returns:
        The raw bytes, with no header.
    """
    if encoding == "pcm_f32le":
        return np.asarray(audio, dtype="<f4").tobytes()
    pcm16 = float_to_s16(audio).tobytes()
    if encoding == "pcm_s16le":
        return pcm16
    if encoding == "pcm_mulaw":
        return audioop.lin2ulaw(pcm16, 2)
    raise ValueError(f"unknown encoding {encoding!r}")


class StreamEncoder:
    """Resamples and encodes one context's audio, chunk by chunk, with no seams.

    Resampling keeps its filter state across chunks (soxr's streaming resampler), so the
    concatenated output equals resampling the whole utterance at once.
    """

    def __init__(self, in_rate: int, out_rate: int, encoding: str):
        """Initialize the encoder.

        Args:
            in_rate: The engine's sample rate.
            out_rate: The rate the client asked for.
            encoding: The encoding the client asked for.
        """
        if encoding not in BYTES_PER_SAMPLE:
            raise ValueError(f"unknown encoding {encoding!r}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.encoding = encoding
        self._resampler = (
            soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")
            if in_rate != out_rate
            else None
        )
        self.samples_out = 0

    @property
    def seconds_out(self) -> float:
        """Returns: the duration of the audio encoded so far."""
        return self.samples_out / self.out_rate

    def encode(self, chunk: np.ndarray) -> bytes:
        """Encode the next chunk.

        Args:
            chunk: Float32 mono samples at ``in_rate``.

        Returns:
            Encoded bytes (possibly empty while the resampler fills).
        """
        return self._emit(chunk, last=False)

    def flush(self) -> bytes:
        """Encode what the resampler still holds at the end of the context.

        Returns:
            The remaining encoded bytes.
        """
        return self._emit(np.zeros(0, dtype=np.float32), last=True)

    def _emit(self, chunk: np.ndarray, last: bool) -> bytes:
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        if self._resampler is not None:
            chunk = self._resampler.resample_chunk(chunk, last=last)
        self.samples_out += len(chunk)
        return encode_samples(chunk, self.encoding) if len(chunk) else b""


def resample(audio: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """Resample a whole signal.

    Args:
        audio: Float32 mono samples.
        in_rate: Their rate.
        out_rate: The rate wanted.

    Returns:
        The resampled float32 samples.
    """
    if in_rate == out_rate:
        return np.asarray(audio, dtype=np.float32)
    return soxr.resample(audio, in_rate, out_rate, quality="HQ").astype(np.float32)


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """Wrap float32 mono samples in a 16-bit PCM WAV file.

    Args:
        audio: Float32 mono samples.
        sample_rate: Their rate.

    Returns:
        The WAV file's bytes.
    """
    buf = io.BytesIO()
    sf.write(buf, float_to_s16(audio), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()
