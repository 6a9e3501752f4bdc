"""The engine interface: the only way the server reaches a synthesizer.

An engine turns normalised text segments into float32 mono audio at its native sample rate. It
never sees sockets, encodings or client sample rates; the session layer does the rest.

Alignment (word timestamps): an engine that can tell when its text is spoken sets
``EngineInfo.word_timestamps``; when a context asks (``SynthesisParams.word_timestamps``) it
yields :class:`AlignedAudio` chunks whose :class:`SpanTiming` entries say when character spans of
its segments are spoken. The session maps those spans back to the client's words.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from chatterbox_sidecar.voices import Voice


class EngineError(Exception):
    """A failure inside an engine, reported to the client as ``engine_error``."""

    code = "engine_error"
    caused_by_input = False  # True: the text made the engine fail; its health is not in doubt


class UnsupportedError(EngineError):
    """A request the engine cannot honour (for example a cloned voice on piper)."""

    code = "unsupported"


class DeviceFault(EngineError):
    """A fault that poisons the engine's device for the whole process (a CUDA error).

    The process cannot recover from it: every later call on the device fails too. The server
    ends the context, stops answering ``/health/live`` with 200, and lets the supervisor
    (systemd, Kubernetes) restart it.
    """


# How the accelerator runtimes word an error that leaves the device context unusable.
_DEVICE_FAULT_MARKERS = (
    "CUDA error",
    "device-side assert",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "illegal memory access",
    "unspecified launch failure",
)


def is_device_fault(error: BaseException) -> bool:
    """Tell whether an exception from an engine means its GPU context is poisoned.

    Args:
        error: The exception; the exceptions it was raised from are looked at too.

    Returns:
        True for torch's ``AcceleratorError`` and CUDA runtime errors; False for everything
        else, including CUDA out-of-memory (the allocator recovers from that).
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names = {cls.__name__ for cls in type(current).__mro__}
        if "OutOfMemoryError" in names:
            return False
        if isinstance(current, DeviceFault) or "AcceleratorError" in names:
            return True
        if any(marker in str(current) for marker in _DEVICE_FAULT_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


@dataclass(frozen=True)
class EngineInfo:
    """What an engine can do, announced to clients in ``ready``.

    Parameters:
        name: Engine name as used in ``TTS_ENGINE`` (``piper``, ``chatterbox``).
        native_sample_rate: Rate of the audio the engine produces, in Hz.
        can_clone: Whether registered voices can be spoken.
        max_concurrency: Contexts the engine generates at once; more wait for a slot.
        max_segment_chars: Longest text segment the engine wants in one piece.
        capacity: Streams the engine keeps gap-free at once (from a calibration on its device),
            or None when it does not know; ``TTS_MAX_STREAMS`` overrides it.
        model: The model served (``TTS_MODEL`` for the chatterbox engine), or None.
        languages: ISO 639-1 codes of the languages it speaks.
        parameters: The :data:`SYNTHESIS_PARAMETERS` it applies; ``started`` names the others
            as not applied.
        tags: Paralinguistic tags (such as ``[laugh]``) the text normaliser passes through
            untouched for the model to perform.
        word_timestamps: Whether the engine yields :class:`AlignedAudio` when a context asks
            for word timestamps.
        alignment_source: How its timings are made, for clients and logs (e.g.
            ``"piper phoneme durations"``); None without word timestamps.
        untimed_languages: Languages it speaks without word timestamps (the multilingual
            model respells Chinese, Japanese and Korean before T3 reads them, so its alignment
            no longer maps to the client's words there).
    """

    name: str
    native_sample_rate: int
    can_clone: bool
    max_concurrency: int
    max_segment_chars: int = 300
    capacity: int | None = None
    model: str | None = None
    languages: tuple[str, ...] = ("en",)
    parameters: tuple[str, ...] = ("exaggeration", "cfg_weight", "temperature", "seed")
    tags: tuple[str, ...] = ()
    word_timestamps: bool = False
    alignment_source: str | None = None
    untimed_languages: tuple[str, ...] = ()

    def times_words(self, language: str) -> bool:
        """Returns: whether a context in ``language`` that asks gets word timestamps."""
        return self.word_timestamps and language not in self.untimed_languages

    @property
    def default_language(self) -> str:
        """Returns: the language of a request that names none: ``en``, else the first."""
        return "en" if "en" in self.languages else self.languages[0]

    def not_applied(self) -> list[str]:
        """Returns: the synthesis parameters this engine ignores, in protocol order."""
        return [name for name in SYNTHESIS_PARAMETERS if name not in self.parameters]


#: The generation parameters of ``synthesize`` an engine may or may not apply.
SYNTHESIS_PARAMETERS = ("exaggeration", "cfg_weight", "temperature", "seed")


@dataclass(frozen=True)
class SynthesisParams:
    """Per-context generation parameters, as the client sent them (with defaults).

    Parameters:
        voice_id: Voice to speak with; ``default`` is the engine's own voice.
        exaggeration: Emotion intensity (Chatterbox), 0.0-2.0.
        cfg_weight: Classifier-free guidance weight (Chatterbox), 0.0-2.0.
        temperature: Sampling temperature (Chatterbox).
        seed: Random seed for reproducible sampling, or None.
        streaming: True to stream segment by segment; False for the batch mode that generates
            all segments of the text together.
        context_id: The context being spoken, for the engine's logs.
        word_timestamps: The context wants to know when its words are spoken; an engine with
            ``EngineInfo.word_timestamps`` then yields :class:`AlignedAudio`. Engines without
            ignore it.
        language: ISO 639-1 code of the text, one of ``EngineInfo.languages`` (the server
            checks it; an engine raises :class:`UnsupportedError` for another).
    """

    voice_id: str = "default"
    exaggeration: float = 0.5
    cfg_weight: float = 0.5
    temperature: float = 0.8
    seed: int | None = None
    streaming: bool = True
    context_id: str | None = None
    word_timestamps: bool = False
    language: str = "en"


@dataclass(frozen=True)
class SpanTiming:
    """When a character span of one of the context's segments is spoken.

    Parameters:
        segment: The segment's index among those the engine read for the context (0-based).
        start_char: First character of the span in that (normalised) segment.
        end_char: Just past the span's last character.
        start: When the span starts, in seconds from the first sample of the chunk that
            carries this timing. At or after 0; it may lie beyond that chunk.
        end: When the span ends, on the same clock (at or after ``start``; it may lie in a
            later chunk, and may be an estimate where the engine cannot know it yet).
    """

    segment: int
    start_char: int
    end_char: int
    start: float
    end: float


@dataclass(frozen=True)
class AlignedAudio:
    """A chunk of audio with the timings of the text that starts in it.

    Rules for engines: a span's timing comes with the chunk that holds its start, or an
    earlier one, never later (so the client has it before the audio); each character is
    timed at most once; a chunk may carry timings and no audio.

    Parameters:
        audio: float32 mono samples at the engine's native rate (may be empty).
        spans: Timings of spans starting in (or after) this chunk.
    """

    audio: np.ndarray
    spans: tuple[SpanTiming, ...] = ()


def chunk_audio(chunk: np.ndarray | AlignedAudio) -> np.ndarray:
    """Returns: the samples of an item an engine yielded, with or without alignment."""
    return chunk.audio if isinstance(chunk, AlignedAudio) else chunk


class Engine(ABC):
    """A streaming synthesizer behind the sidecar's protocol.

    Life cycle: ``await start()`` once (load and warm up), then any number of concurrent
    ``synthesize`` calls, then ``await close()``.
    """

    info: EngineInfo

    @abstractmethod
    async def start(self) -> None:
        """Load the model and warm it up; the server reports ready once this returns."""

    @abstractmethod
    def synthesize(
        self,
        segments: AsyncIterator[str],
        params: SynthesisParams,
        voice: Voice | None,
    ) -> AsyncIterator[np.ndarray | AlignedAudio]:
        """Stream audio for one context.

        Args:
            segments: Normalised text segments (sentences or clauses) of the context, as they
                become available; the iterator ends when the context's text is complete.
            params: Generation parameters for the context.
            voice: The registered voice to speak with, or None for the engine's default.

        Returns:
            An async iterator of float32 mono chunks at ``info.native_sample_rate``; with
            ``params.word_timestamps`` and ``info.word_timestamps``, :class:`AlignedAudio`
            chunks. Closing it (or cancelling the task that iterates it) must stop generation
            within one chunk.

        Raises:
            UnsupportedError: If the engine cannot speak with ``voice`` or honour ``params``.
            EngineError: On any other failure of the engine.
        """

    @abstractmethod
    async def prepare_voice(self, voice: Voice) -> None:
        """Compute and cache what the engine needs for a newly registered voice.

        Args:
            voice: The voice, already stored on disk.

        Raises:
            EngineError: If the reference audio cannot be turned into conditionals.
        """

    async def forget_voice(self, voice_id: str) -> None:  # noqa: B027 - optional hook
        """Drop anything cached in memory for a deleted voice.

        Args:
            voice_id: The voice that was deleted.
        """

    def counters(self) -> dict[str, int]:
        """Returns: the engine's own event counts for ``/metrics`` (e.g. worker crashes)."""
        return {}

    @property
    def healthy(self) -> bool:
        """Returns: whether the engine can take work now (False while no worker is up)."""
        return True

    @property
    def falling_behind(self) -> bool:
        """Returns: whether the engine lately gave a playing listener its audio late.

        It is then past what it can keep gap-free, whatever its capacity says, and the server
        takes no new stream. Engines that do not watch for it never are.
        """
        return False

    @abstractmethod
    async def close(self) -> None:
        """Release the model and any worker threads or processes."""
