"""The shared state of a running sidecar: configuration, engine, voice store and metrics.

Connections (websocket sessions and HTTP routes) reach the engine and the voices through here.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager

import numpy as np
from loguru import logger

from chatterbox_sidecar import __version__, protocol
from chatterbox_sidecar.audio import resample, wav_bytes
from chatterbox_sidecar.config import SidecarConfig
from chatterbox_sidecar.engines.base import Engine, EngineError, SynthesisParams, is_device_fault
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
SPOKEN_CHARS_PER_SECOND = 15.0  # normalised English text spoken at an ordinary pace
STREAMS_PER_ENGINE_SLOT = 8  # capacity of an engine that does not know its own
DEVICE_FAULT_MESSAGE = "the engine's device failed; the server must be restarted"


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
        self.http_streams = 0  # HTTP syntheses in progress
        self.device_fault: str | None = None  # set once the engine's device failed for good
        # called once on a device fault: each connection ends its open contexts
        self.fault_listeners: set[Callable[[ProtocolError], Awaitable[None]]] = set()
        self._tasks: set[asyncio.Task] = set()
        self.metrics.queued_chunks.set_function(
            lambda: sum(ctx.audio.qsize() for ctx in self.contexts)
        )
        self.metrics.active_streams.set_function(lambda: self.active_streams)
        self.metrics.capacity.set_function(lambda: self.capacity)
        self.metrics.add_engine_counters(lambda: self.engine.counters())
        self.engine_failures = 0  # consecutive contexts the engine failed
        self.last_engine_error: str | None = None

    @property
    def capacity(self) -> int:
        """Returns: streams accepted at once: ``TTS_MAX_STREAMS``, else the engine's own."""
        info = self.engine.info
        return (
            self.config.max_streams
            or info.capacity
            or STREAMS_PER_ENGINE_SLOT * info.max_concurrency
        )

    @property
    def active_streams(self) -> int:
        """Returns: open contexts of every connection plus HTTP syntheses in progress."""
        return len(self.contexts) + self.http_streams

    @property
    def contexts_per_connection(self) -> int:
        """Returns: open contexts one connection may hold: its share of the capacity.

        No connection may hold more than half the server's streams, so that one client can
        never lock every other out (``TTS_MAX_CONTEXTS`` caps it further).
        """
        return max(1, min(self.config.max_contexts_per_connection, self.capacity // 2))

    def check_admission(self, context_id: str | None = None) -> None:
        """Refuse a new stream the server cannot take now.

        Args:
            context_id: The context asking, for the error.

        Raises:
            ProtocolError: ``busy`` (draining, or at capacity) or ``engine_error`` after a
                device fault.
        """
        if self.device_fault is not None:
            raise ProtocolError("engine_error", DEVICE_FAULT_MESSAGE, context_id)
        if self.draining:
            raise ProtocolError(
                "busy", "the server is shutting down; open a new connection", context_id
            )
        load = self._load_limit()
        if load == "at_capacity":
            raise ProtocolError(
                "busy",
                f"server at capacity: {self.capacity} streams in progress (TTS_MAX_STREAMS); "
                "try another server or retry shortly",
                context_id,
            )
        if load == "falling_behind":
            raise ProtocolError(
                "busy",
                "server falling behind: a stream's audio came late in the last few seconds "
                "(TTS_OVERLOAD_HOLD_SECONDS); try another server or retry shortly",
                context_id,
            )

    def _load_limit(self) -> str | None:
        """The check behind both :meth:`check_admission` and :attr:`status`.

        Returns:
            Why the load turns new streams away now: ``at_capacity`` or ``falling_behind``;
            None when it does not.
        """
        if self.active_streams >= self.capacity:
            return "at_capacity"
        if self.engine.falling_behind:
            return "falling_behind"
        return None

    @contextmanager
    def http_stream(self) -> Iterator[None]:
        """Count one HTTP synthesis as a stream while it runs (see :meth:`check_admission`).

        Raises:
            ProtocolError: As :meth:`check_admission`.
        """
        self.check_admission()
        self.http_streams += 1
        try:
            yield
        finally:
            self.http_streams -= 1

    def record_failure(self, error: BaseException, context_id: str) -> tuple[str, str]:
        """Classify an unexpected engine exception and note a device fault.

        Args:
            error: What the engine raised.
            context_id: The context it ended, for the log.

        Returns:
            The error code and the message for the client.
        """
        if is_device_fault(error):
            if self.device_fault is None:
                logger.critical(
                    f"Context {context_id}: the engine's device failed "
                    f"({type(error).__name__}: {error}); /health/live now answers 503 so the "
                    "supervisor restarts the sidecar"
                )
                self.device_fault = f"{type(error).__name__}: {error}"
                self.metrics.device_fault.set(1)
                fault = ProtocolError("engine_error", DEVICE_FAULT_MESSAGE)
                for listener in list(self.fault_listeners):
                    task = asyncio.ensure_future(listener(fault))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            return "engine_error", DEVICE_FAULT_MESSAGE
        logger.opt(exception=error).error(f"Context {context_id}: engine failed")
        return "engine_error", f"synthesis failed ({type(error).__name__})"

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
            "model": info.model,
            "languages": list(info.languages),
            "default_language": info.default_language,
            "parameters": list(info.parameters),
            "tags": list(info.tags),
            "version": __version__,
            "sample_rate": protocol.DEFAULT_SAMPLE_RATE,
            "native_sample_rate": info.native_sample_rate,
            "encodings": list(protocol.ENCODINGS),
            "can_clone": info.can_clone,
            "word_timestamps": info.word_timestamps,
            "streaming_default": self.config.streaming,
            "voices": [v["voice_id"] for v in self.list_voices()],
            "limits": self.config.limits(),
        }

    @property
    def live(self) -> bool:
        """Returns: whether the process can still work at all (the liveness probe)."""
        return self.device_fault is None

    @property
    def healthy(self) -> bool:
        """Returns: whether the sidecar takes new work now (the readiness probe)."""
        return self.status == "ready"

    @property
    def status(self) -> str:
        """The sidecar's state for ``/health``.

        Returns:
            ``ready``, or why not: ``failed``, ``device_fault``, ``loading``, ``draining``,
            ``degraded`` (the engine failed several contexts in a row, or has no worker up),
            ``at_capacity`` or ``falling_behind`` (the engine gave a stream its audio late
            lately; see :attr:`Engine.falling_behind`).
        """
        if self.load_error:
            return "failed"
        if self.device_fault is not None:
            return "device_fault"
        if not self.ready.is_set():
            return "loading"
        if self.draining:
            return "draining"
        if self.engine_failures >= ENGINE_FAILURES_UNHEALTHY or not self.engine.healthy:
            return "degraded"
        return self._load_limit() or "ready"

    def health(self) -> dict:
        """Returns: the health document served at ``/health`` (no error text: it is open)."""
        return {
            "status": self.status,
            "engine": self.engine.info.name,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "active_streams": self.active_streams,
            "capacity": self.capacity,
            "consecutive_engine_failures": self.engine_failures,
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
        self.metrics.last_engine_error.info({"message": error})
        if self.engine_failures == ENGINE_FAILURES_UNHEALTHY:
            logger.error(
                f"Engine failed {self.engine_failures} contexts in a row (last: {error}); "
                "/health/ready answers 503 until a context succeeds"
            )

    def list_voices(self) -> list[dict]:
        """Returns: the default voice and every registered voice, as listed to clients."""
        builtin = {"voice_id": DEFAULT_VOICE_ID, "kind": "builtin", "usable": True}
        usable = self.engine.info.can_clone
        return [builtin] + [{**v.describe(), "usable": usable} for v in self.voices.list()]

    def synthesis_params(
        self, msg: protocol.Synthesize, context_id: str, streaming: bool
    ) -> SynthesisParams:
        """The engine's parameters for a ``synthesize`` request (websocket or HTTP).

        Word timestamps are on when the request asks and the engine can align. The language is
        the request's, else the model's default (``en`` where it has it).

        Raises:
            ProtocolError: ``unsupported`` for a language the engine's model does not speak.
        """
        language = self.resolve_language(msg.language, context_id)
        return SynthesisParams(
            voice_id=msg.voice_id,
            exaggeration=msg.exaggeration,
            cfg_weight=msg.cfg_weight,
            temperature=msg.temperature,
            seed=msg.seed,
            streaming=streaming,
            context_id=context_id,
            word_timestamps=msg.word_timestamps and self.engine.info.times_words(language),
            language=language,
        )

    def resolve_language(self, language: str | None, context_id: str | None = None) -> str:
        """The language a request speaks in: its own, checked, or the model's default.

        Args:
            language: A parsed ISO 639-1 code, or None.
            context_id: The context asking, for the error.

        Raises:
            ProtocolError: ``unsupported`` for a language the engine's model does not speak.
        """
        info = self.engine.info
        if language is None:
            return info.default_language
        if language not in info.languages:
            model = info.model or info.name
            raise ProtocolError(
                "unsupported",
                f"language '{language}' is not spoken by {model} on this server; it speaks "
                f"{', '.join(info.languages)}"
                + (
                    " (TTS_MODEL=chatterbox-multilingual speaks 23 languages)"
                    if len(info.languages) == 1
                    else ""
                ),
                context_id,
            )
        return language

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

    def check_audio_estimate(self, spoken_chars: int, context_id: str | None = None) -> None:
        """Refuse text whose speech would outlast ``TTS_MAX_AUDIO_SECONDS``.

        Args:
            spoken_chars: Characters of normalised text (numbers spelt out) so far.
            context_id: The context, for the error.

        Raises:
            ProtocolError: ``text_too_long``.
        """
        estimate = spoken_chars / SPOKEN_CHARS_PER_SECOND
        if estimate > self.config.max_audio_seconds:
            raise ProtocolError(
                "text_too_long",
                f"the text would take about {estimate:.0f} s to speak; the limit is "
                f"{self.config.max_audio_seconds:g} s of audio per context",
                context_id,
            )

    async def synthesize_stream(
        self, text: str, params: SynthesisParams, context_id: str = "http"
    ) -> AsyncIterator[np.ndarray]:
        """Synthesize a whole text for an HTTP route, chunk by chunk as the engine makes them.

        Everything a request can be refused for (an unknown or unusable voice, capacity, the
        audio-seconds estimate) is raised before the first chunk, so a route that waits for it
        can still answer with an error status. The synthesis counts as one stream against the
        capacity until the iterator ends or is closed; closing it (or cancelling its consumer)
        stops the engine within one chunk.

        Args:
            text: The text, already checked against the length limit and cleaned.
            params: Generation parameters (a validated ``voice_id``).
            context_id: Names the synthesis in logs.

        Yields:
            Float32 mono chunks at the engine's native rate.

        Raises:
            ProtocolError: ``voice_not_found``, ``unsupported``, ``busy``, ``text_too_long``
                (the estimate, or the audio reaching ``TTS_MAX_AUDIO_SECONDS``).
            EngineError: If synthesis fails (device faults are recorded as on the websocket).
        """
        voice = self.resolve_voice(params.voice_id)
        info = self.engine.info
        max_samples = self.config.max_audio_seconds * info.native_sample_rate
        samples = 0
        with self.http_stream():
            pieces = await asyncio.to_thread(
                functools.partial(
                    split_text,
                    text,
                    info.max_segment_chars,
                    keep_tags=info.tags,
                    language=params.language,
                )
            )
            self.check_audio_estimate(sum(len(p) for p in pieces))

            async def segments():
                for segment in pieces:
                    yield segment

            stream = self.engine.synthesize(segments(), params, voice)
            try:
                async for chunk in stream:
                    samples += len(chunk)
                    if samples > max_samples:  # the estimate let it through; the audio did not
                        raise ProtocolError(
                            "text_too_long",
                            f"the audio reached the limit of {self.config.max_audio_seconds:g} s",
                        )
                    yield chunk
            except (ProtocolError, asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as e:
                if isinstance(e, EngineError) and not is_device_fault(e):
                    if not e.caused_by_input:
                        self.record_engine_outcome(str(e))
                    raise
                _, message = self.record_failure(e, context_id)
                self.record_engine_outcome(message)
                raise EngineError(message) from e
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await asyncio.shield(aclose())
        self.record_engine_outcome(None)
        self.metrics.characters.inc(len(text))
        self.metrics.audio_seconds.inc(samples / info.native_sample_rate)

    async def synthesize_wav(
        self, text: str, voice_id: str, sample_rate: int, language: str | None = None
    ) -> bytes:
        """Synthesize a whole text into a WAV file (the one-shot ``GET /v1/synthesize``).

        Args:
            text: The text, already checked against the length limit and cleaned.
            voice_id: A validated voice id.
            sample_rate: Output rate in Hz.
            language: A parsed ISO 639-1 code, or None for the model's default.

        Returns:
            The WAV file's bytes (16-bit PCM, mono).

        Raises:
            ProtocolError: As :meth:`synthesize_stream`.
            EngineError: If synthesis fails.
        """
        params = SynthesisParams(
            voice_id=voice_id,
            streaming=False,
            context_id="http",
            language=self.resolve_language(language),
        )
        stream = self.synthesize_stream(text, params)
        async with aclosing(stream):
            chunks = [chunk async for chunk in stream]
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        rate = self.engine.info.native_sample_rate
        return wav_bytes(resample(audio, rate, sample_rate), sample_rate)
