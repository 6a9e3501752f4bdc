"""The shared state of a running sidecar: configuration, engine, voice store and metrics.

Connections (websocket sessions and HTTP routes) reach the engine and the voices through here.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from loguru import logger

from chatterbox_sidecar import __version__, protocol
from chatterbox_sidecar.audio import resample, wav_bytes
from chatterbox_sidecar.config import SidecarConfig
from chatterbox_sidecar.engines.base import Engine, EngineError, SynthesisParams
from chatterbox_sidecar.metrics import Metrics
from chatterbox_sidecar.protocol import ProtocolError
from chatterbox_sidecar.text import split_text
from chatterbox_sidecar.voices import (
    DEFAULT_VOICE_ID,
    Voice,
    VoiceError,
    VoiceStore,
    validate_reference_wav,
)

ENGINE_FAILURES_UNHEALTHY = 3  # consecutive failed contexts before /health stops saying ready


class App:
    """One sidecar process's engine, voices, metrics and readiness."""

    def __init__(self, config: SidecarConfig, engine: Engine, voices: VoiceStore):
        """Initialize the app; the engine is started by :meth:`start_engine`.

        Args:
            config: The configuration.
            engine: The engine, not yet started.
            voices: The voice store.
        """
        self.config = config
        self.engine = engine
        self.voices = voices
        self.metrics = Metrics()
        self.ready = asyncio.Event()
        self.load_error: str | None = None
        self.started_at = time.time()
        self.draining = False
        self.contexts: set = set()  # every open context of every connection
        self.metrics.queued_chunks.set_function(
            lambda: sum(ctx.audio.qsize() for ctx in self.contexts)
        )
        self.max_active_contexts = config.max_active_contexts or 8 * engine.info.max_concurrency
        self.engine_failures = 0  # consecutive contexts the engine failed
        self.last_engine_error: str | None = None

    async def start_engine(self) -> None:
        """Load and warm up the engine; readiness follows success."""
        t0 = time.perf_counter()
        try:
            await self.engine.start()
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            logger.exception(f"Engine {self.engine.info.name} failed to start")
            raise
        self.ready.set()
        logger.info(
            f"Engine {self.engine.info.name} ready in {time.perf_counter() - t0:.1f} s "
            f"({self.engine.info.native_sample_rate} Hz, clone={self.engine.info.can_clone})"
        )

    def ready_message(self) -> dict:
        """Returns: the ``ready`` message sent on every new connection."""
        info = self.engine.info
        return {
            "type": "ready",
            "protocol": protocol.PROTOCOL_VERSION,
            "engine": info.name,
            "version": __version__,
            "sample_rate": protocol.DEFAULT_SAMPLE_RATE,
            "native_sample_rate": info.native_sample_rate,
            "encodings": list(protocol.ENCODINGS),
            "can_clone": info.can_clone,
            "streaming_default": self.config.streaming,
            "voices": [v["voice_id"] for v in self.list_voices()],
            "limits": self.config.limits(),
        }

    @property
    def healthy(self) -> bool:
        """Returns: whether the sidecar should take new work (the readiness probe)."""
        return (
            self.ready.is_set()
            and not self.draining
            and self.engine_failures < ENGINE_FAILURES_UNHEALTHY
        )

    def health(self) -> dict:
        """Returns: the health document served at ``/health``."""
        if self.load_error:
            status = "failed"
        elif not self.ready.is_set():
            status = "loading"
        elif self.draining:
            status = "draining"
        elif self.engine_failures >= ENGINE_FAILURES_UNHEALTHY:
            status = "degraded"
        else:
            status = "ready"
        return {
            "status": status,
            "engine": self.engine.info.name,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "active_contexts": len(self.contexts),
            "consecutive_engine_failures": self.engine_failures,
            "error": self.load_error or (self.last_engine_error if self.engine_failures else None),
        }

    def record_engine_outcome(self, error: str | None) -> None:
        """Track whether the engine keeps failing, for ``/health``.

        Args:
            error: None after a context the engine completed, else what went wrong.
        """
        if error is None:
            self.engine_failures = 0
            return
        self.engine_failures += 1
        self.last_engine_error = error
        self.metrics.engine_errors.inc()
        if self.engine_failures == ENGINE_FAILURES_UNHEALTHY:
            logger.error(f"Engine failed {self.engine_failures} contexts in a row: {error}")

    def list_voices(self) -> list[dict]:
        """Returns: the default voice and every registered voice, as listed to clients."""
        builtin = {"voice_id": DEFAULT_VOICE_ID, "kind": "builtin", "usable": True}
        usable = self.engine.info.can_clone
        return [builtin] + [{**v.describe(), "usable": usable} for v in self.voices.list()]

    def resolve_voice(self, voice_id: str, context_id: str | None = None) -> Voice | None:
        """Find the voice a request names.

        Args:
            voice_id: The requested voice.
            context_id: The context asking, for the error message.

        Returns:
            None for the engine's default voice, else the registered voice.

        Raises:
            ProtocolError: ``voice_not_found`` or ``unsupported`` (a cloned voice on an engine
                that cannot clone).
        """
        if voice_id == DEFAULT_VOICE_ID:
            return None
        voice = self.voices.get(voice_id)
        if voice is None:
            raise ProtocolError(
                "voice_not_found", f"voice '{voice_id}' is not registered", context_id
            )
        if not self.engine.info.can_clone:
            raise ProtocolError(
                "unsupported",
                f"voice '{voice_id}' is a cloned voice; the {self.engine.info.name} engine "
                "cannot clone (run the chatterbox engine on a GPU to use it)",
                context_id,
            )
        return voice

    async def register_voice(self, voice_id: str, data: bytes) -> Voice:
        """Validate and store a voice, letting the engine prepare it before it is committed.

        Args:
            voice_id: A validated voice id.
            data: The reference WAV bytes.

        Returns:
            The stored voice.

        Raises:
            ProtocolError: ``invalid_audio``, ``invalid_request`` or ``engine_error``.
        """
        try:
            audio = await asyncio.to_thread(validate_reference_wav, data)
            voice = await self.voices.register(voice_id, audio, prepare=self.engine.prepare_voice)
        except VoiceError as e:
            raise ProtocolError(e.code, e.message) from None
        except EngineError as e:
            raise ProtocolError(e.code, f"could not prepare voice '{voice_id}': {e}") from None
        self.metrics.voices.labels("register").inc()
        return voice

    async def delete_voice(self, voice_id: str) -> None:
        """Delete a voice and drop the engine's cache of it.

        Args:
            voice_id: A validated voice id.

        Raises:
            ProtocolError: ``voice_not_found`` or ``invalid_request``.
        """
        try:
            await self.voices.delete(voice_id)
        except VoiceError as e:
            raise ProtocolError(e.code, e.message) from None
        await self.engine.forget_voice(voice_id)
        self.metrics.voices.labels("delete").inc()

    async def synthesize_wav(self, text: str, voice_id: str, sample_rate: int) -> bytes:
        """Synthesize a whole text into a WAV file (the one-shot HTTP route).

        Args:
            text: The text, already checked against the length limit.
            voice_id: A validated voice id.
            sample_rate: Output rate in Hz.

        Returns:
            The WAV file's bytes (16-bit PCM, mono).

        Raises:
            ProtocolError: ``voice_not_found`` or ``unsupported``.
            EngineError: If synthesis fails.
        """
        voice = self.resolve_voice(voice_id)
        info = self.engine.info

        async def segments():
            for segment in split_text(text, info.max_segment_chars):
                yield segment

        params = SynthesisParams(voice_id=voice_id, streaming=False)
        chunks = [c async for c in self.engine.synthesize(segments(), params, voice)]
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        self.metrics.characters.inc(len(text))
        self.metrics.audio_seconds.inc(len(audio) / info.native_sample_rate)
        return wav_bytes(resample(audio, info.native_sample_rate, sample_rate), sample_rate)
