"""The engine interface: the only way the server reaches a synthesizer.

An engine turns normalised text segments into float32 mono audio at its native sample rate. It
never sees sockets, encodings or client sample rates; the session layer does the rest.
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


class UnsupportedError(EngineError):
    """A request the engine cannot honour (for example a cloned voice on piper)."""

    code = "unsupported"


@dataclass(frozen=True)
class EngineInfo:
    """What an engine can do, announced to clients in ``ready``.

    Parameters:
        name: Engine name as used in ``TTS_ENGINE`` (``piper``, ``chatterbox``).
        native_sample_rate: Rate of the audio the engine produces, in Hz.
        can_clone: Whether registered voices can be spoken.
        max_concurrency: Contexts the engine generates at once; more wait for a slot.
        max_segment_chars: Longest text segment the engine wants in one piece.
    """

    name: str
    native_sample_rate: int
    can_clone: bool
    max_concurrency: int
    max_segment_chars: int = 300
    capacity: int | None = None


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
    """

    voice_id: str = "default"
    exaggeration: float = 0.5
    cfg_weight: float = 0.5
    temperature: float = 0.8
    seed: int | None = None
    streaming: bool = True


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
    ) -> AsyncIterator[np.ndarray]:
        """Stream audio for one context.

        Args:
            segments: Normalised text segments (sentences or clauses) of the context, as they
                become available; the iterator ends when the context's text is complete.
            params: Generation parameters for the context.
            voice: The registered voice to speak with, or None for the engine's default.

        Returns:
            An async iterator of float32 mono chunks at ``info.native_sample_rate``. Closing it
            (or cancelling the task that iterates it) must stop generation within one chunk.

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

    @abstractmethod
    async def close(self) -> None:
        """Release the model and any worker threads or processes."""
