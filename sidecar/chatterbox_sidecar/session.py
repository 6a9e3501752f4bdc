"""One websocket connection: its contexts, their generation, and in-order delivery.

Each context has a generation task (text segments -> engine -> encoded audio, into a bounded
queue) and the connection has one delivery task that sends the contexts' audio strictly in the
order they were opened. Later contexts generate while earlier ones are still being delivered;
their audio waits in their queue, which bounds the memory one connection can hold.

Word timestamps ride the same queue: the words an engine chunk times are queued just before
that chunk's audio, so the client always has them before (or with) the audio they describe.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from loguru import logger

from chatterbox_sidecar import protocol
from chatterbox_sidecar.app import App
from chatterbox_sidecar.audio import BYTES_PER_SAMPLE, StreamEncoder
from chatterbox_sidecar.engines.base import (
    AlignedAudio,
    EngineError,
    SynthesisParams,
    is_device_fault,
)
from chatterbox_sidecar.protocol import (
    Cancel,
    ClientMessage,
    DeleteVoice,
    Flush,
    KeepAlive,
    ListVoices,
    ProtocolError,
    RegisterVoice,
    Synthesize,
)
from chatterbox_sidecar.text import SourceSpan, TextSegmenter
from chatterbox_sidecar.voices import Voice
from chatterbox_sidecar.words import Owners, WordTime, WordTimeline

AUDIO_QUEUE_CHUNKS = 64  # encoded chunks a context may hold before its generation waits
ENDED_IDS_REMEMBERED = 4096
LONG_TEXT_CHARS = 1000  # text pieces longer than this are segmented in a worker thread
UNDERRUN_TOLERANCE_S = 0.05  # audio this late after playback reached it counts as a gap

Send = Callable[[str | bytes], Awaitable[None]]
CloseConnection = Callable[[int, str], Awaitable[None]]


@dataclass(frozen=True)
class _End:
    """Generation finished normally."""


@dataclass(frozen=True)
class _Failed:
    """Generation failed; the context ends with this error."""

    code: str
    message: str
    engine_fault: bool = False  # counts towards the engine's health (not the text's fault)


@dataclass(frozen=True)
class _Words:
    """Client words timed by the chunk that follows (a ``timestamps`` message)."""

    words: list[WordTime]


_END = _End()
_Cut = tuple[list[SourceSpan], list[Owners] | None]


class Context:
    """One context: its text, its generation task and its queue of encoded audio."""

    def __init__(
        self,
        context_id: str,
        request: Synthesize,
        params: SynthesisParams,
        voice: Voice | None,
        app: App,
    ):
        """Initialize the context (generation starts with :meth:`start`).

        Args:
            context_id: Its id.
            request: The ``synthesize`` message that opened it.
            params: Generation parameters in effect.
            voice: The registered voice, or None for the default voice.
            app: The sidecar.
        """
        self.context_id = context_id
        self.request = request
        self.params = params
        self.voice = voice
        self.opened_at = time.perf_counter()
        self.text_chars = 0
        self.spoken_chars = 0  # normalised characters sent to the engine
        self.last_text_at = time.monotonic()
        self.text_complete = False
        self.cancelled = False
        self.audio: asyncio.Queue[bytes | _Words | _End | _Failed] = asyncio.Queue(
            AUDIO_QUEUE_CHUNKS
        )
        # The client's words and their timings, when the context asked and the engine aligns.
        self.timeline = WordTimeline() if params.word_timestamps else None
        self.encoder = StreamEncoder(
            app.engine.info.native_sample_rate, request.sample_rate, request.encoding
        )
        self._app = app
        info = app.engine.info
        self._segmenter = TextSegmenter(
            max_chars=info.max_segment_chars, keep_tags=info.tags, language=params.language
        )
        self._segments: asyncio.Queue[str | None] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.generation_seconds = 0.0

    def start(self) -> None:
        """Start generating."""
        self._task = asyncio.create_task(self._generate(), name=f"tts-ctx-{self.context_id}")

    async def add_text(self, text: str) -> None:
        """Append text; complete segments go to the engine at once.

        Args:
            text: The next piece, concatenated verbatim to what came before.

        Raises:
            ProtocolError: ``text_too_long`` if the speech would outlast the audio limit.
        """
        self.text_chars += len(text)
        self.last_text_at = time.monotonic()
        cut = await self._segment(lambda: self._cut(self._segmenter.push_sources(text)), len(text))
        self._queue_segments(cut)

    async def close_text(self) -> None:
        """Mark the text complete: the rest goes to the engine and generation can finish.

        Raises:
            ProtocolError: ``text_too_long`` if the speech would outlast the audio limit.
        """
        if self.text_complete:
            return
        self.text_complete = True
        cut = await self._segment(
            lambda: self._cut(self._segmenter.flush_sources()), self.text_chars
        )
        self._queue_segments(cut)
        self._segments.put_nowait(None)

    @staticmethod
    async def _segment(segment: Callable[[], _Cut], size: int) -> _Cut:
        # Splitting and normalising cost tens of microseconds a character: a long text is done
        # off the event loop so that other connections' audio keeps flowing meanwhile.
        if size > LONG_TEXT_CHARS:
            return await asyncio.to_thread(segment)
        return segment()

    def _cut(self, spans: list[SourceSpan]) -> _Cut:
        """The cuts, and which client word each segment character stands for (if timed)."""
        return spans, WordTimeline.prepare(spans) if self.timeline is not None else None

    def _queue_segments(self, cut: _Cut) -> None:
        spans, owners = cut
        segments = [segment for span in spans for segment in span.segments]
        self.spoken_chars += sum(len(segment) for segment in segments)
        self._app.check_audio_estimate(self.spoken_chars, self.context_id)
        if self.timeline is not None:
            self.timeline.add_sources(spans, owners)  # in the order the engine reads them
        for segment in segments:
            self._segments.put_nowait(segment)

    def cancel(self) -> None:
        """Stop generating at once and drop queued audio; delivery sees the cancel next."""
        self.cancelled = True
        if self._task is not None:
            self._task.cancel()
        while not self.audio.empty():
            self.audio.get_nowait()

    async def wait_generation(self) -> None:
        """Wait for the generation task to end (after a cancel, for clean-up)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _segment_iter(self) -> AsyncIterator[str]:
        while (segment := await self._segments.get()) is not None:
            yield segment

    async def _generate(self) -> None:
        started = time.perf_counter()
        app = self._app
        rate = app.engine.info.native_sample_rate
        max_samples = app.config.max_audio_seconds * rate
        samples = 0
        timeline = self.timeline
        stream = app.engine.synthesize(self._segment_iter(), self.params, self.voice)
        try:
            async for chunk in stream:
                audio = chunk.audio if isinstance(chunk, AlignedAudio) else chunk
                if timeline is not None and isinstance(chunk, AlignedAudio) and chunk.spans:
                    at = samples / rate  # the chunk's first sample, on the context's clock
                    for t in chunk.spans:
                        timeline.time(t.segment, t.start_char, t.end_char, at + t.start, at + t.end)
                    words = timeline.take()
                    if words:
                        await self.audio.put(_Words(words))  # before the audio they describe
                samples += len(audio)
                if samples > max_samples:  # the estimate let it through; the audio did not
                    await self.audio.put(
                        _Failed("text_too_long", _AUDIO_LIMIT.format(app.config.max_audio_seconds))
                    )
                    return
                data = self.encoder.encode(audio)
                if data:
                    await self.audio.put(data)
            if timeline is not None:
                words = timeline.take(final_time=samples / rate)  # words with nothing to say
                if words:
                    await self.audio.put(_Words(words))
            tail = self.encoder.flush()
            if tail:
                await self.audio.put(tail)
            await self.audio.put(_END)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if isinstance(e, EngineError) and not is_device_fault(e):
                logger.warning(f"Context {self.context_id}: {e.code}: {e}")
                fault = e.code == "engine_error" and not e.caused_by_input
                await self.audio.put(_Failed(e.code, str(e), fault))
            else:
                code, message = app.record_failure(e, self.context_id)
                await self.audio.put(_Failed(code, message, True))
        finally:
            self.generation_seconds = time.perf_counter() - started
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await asyncio.shield(aclose())


class Playback:
    """A listener's playback of one context, as the server sees it from what it sent when.

    Playback starts when the first audio byte is sent and runs in real time; a chunk sent after
    playback reached its start makes the player wait and resume from it, and a wait of more
    than ``UNDERRUN_TOLERANCE_S`` is an underrun (the listener heard a gap). The same model as
    ``scripts/bench_tts.py``'s ``continuity``, which measures it at the client.
    """

    def __init__(self, bytes_per_second: float):
        """Initialize the tracker.

        Args:
            bytes_per_second: Encoded audio bytes per second of audio.
        """
        self._bytes_per_second = bytes_per_second
        self._start: float | None = None
        self._audio_s = 0.0
        self.underruns = 0
        self.underrun_seconds = 0.0
        self.longest_gap = 0.0

    def sent(self, size: int, now: float) -> None:
        """Account for one chunk sent.

        Args:
            size: Its bytes.
            now: When it was sent (monotonic seconds).
        """
        if self._start is None:
            self._start = now
        else:
            late = now - (self._start + self._audio_s)
            if late > 0:
                self._start += late  # the player waited for this chunk; it resumes from here
            if late > UNDERRUN_TOLERANCE_S:
                self.underruns += 1
                self.underrun_seconds += late
                self.longest_gap = max(self.longest_gap, late)
        self._audio_s += size / self._bytes_per_second


class Session:
    """The protocol state machine of one websocket connection."""

    def __init__(self, app: App, send: Send, close: CloseConnection, peer: str = "?"):
        """Initialize the session.

        Args:
            app: The sidecar.
            send: Sends one frame (text or binary) to the client.
            close: Closes the connection with a code and reason.
            peer: The client's address, for logs.
        """
        self._app = app
        self._send = send
        self._close = close
        self._peer = peer
        self._contexts: dict[str, Context] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._delivery: asyncio.Queue[Context] = asyncio.Queue()
        self._current: Context | None = None
        self._tasks: set[asyncio.Task] = set()
        self._deliverer = asyncio.create_task(self._deliver(), name=f"tts-deliver-{peer}")
        self._watchdog = asyncio.create_task(self._expire_idle_contexts(), name=f"tts-idle-{peer}")
        app.fault_listeners.add(self._end_all)

    def __str__(self) -> str:
        return f"Session({self._peer})"

    @property
    def has_open_contexts(self) -> bool:
        """Returns: whether any context of this connection is still open."""
        return bool(self._contexts)

    async def send_json(self, message: dict) -> None:
        """Send a server message, counting errors in the metrics.

        Args:
            message: The message.

        Raises:
            ConnectionAbortedError: The client did not take it within ``TTS_STALL_SECONDS``;
                the connection is being closed.
        """
        if message["type"] == "error":
            self._app.metrics.errors.labels(message["code"]).inc()
        await self._send_frame(protocol.encode(message), "messages")

    async def _send_frame(self, data: str | bytes, what: str) -> None:
        """Send one frame; a client that does not take it in time is cut off."""
        try:
            await asyncio.wait_for(self._send(data), self._app.config.stall_seconds)
        except TimeoutError:
            self._app.metrics.stalls.inc()
            self._app.metrics.errors.labels("stalled").inc()
            logger.warning(
                f"{self}: client stopped reading {what} for "
                f"{self._app.config.stall_seconds:g} s; closing the connection"
            )
            self._spawn(self._close(1008, f"client stopped reading {what}"))
            raise ConnectionAbortedError(f"client stopped reading {what}") from None

    async def handle_text(self, raw: str) -> None:
        """Handle one client text frame; every failure is answered with an ``error``.

        Args:
            raw: The frame.
        """
        try:
            message = protocol.parse_client_message(raw)
            await self._dispatch(message)
        except ProtocolError as e:
            await self.send_json(protocol.error(e.code, e.message, e.context_id))

    async def handle_binary(self) -> None:
        """Answer a binary frame from the client, which the protocol does not use."""
        await self.send_json(
            protocol.error("invalid_request", "binary frames are not accepted from clients")
        )

    async def _dispatch(self, message: ClientMessage) -> None:
        logger.debug(f"{self}: recv {_describe(message)}")
        if isinstance(message, Synthesize):
            await self._synthesize(message)
        elif isinstance(message, Flush):
            ctx = self._contexts.get(message.context_id)
            if ctx is not None:
                try:
                    await ctx.close_text()
                except ProtocolError as e:
                    await self._end_with_error(ctx, e)
        elif isinstance(message, Cancel):
            await self._cancel(message.context_id)
        elif isinstance(message, RegisterVoice | DeleteVoice):
            self._spawn(self._voice_operation(message))
        elif isinstance(message, ListVoices):
            await self.send_json({"type": "voices", "voices": self._app.list_voices()})
        elif isinstance(message, KeepAlive):
            pass  # its arrival is the point: the connection is in use

    async def _synthesize(self, msg: Synthesize) -> None:
        app = self._app
        context_id = msg.context_id
        if context_id is None:
            if msg.continue_:
                raise ProtocolError(
                    "invalid_request", "'continue': true needs a 'context_id' to continue"
                )
            context_id = uuid.uuid4().hex
        ctx = self._contexts.get(context_id)
        if ctx is None:
            if context_id in self._ended:
                raise ProtocolError(
                    "invalid_request", f"context '{context_id}' has already ended", context_id
                )
            app.check_admission(context_id)
            if len(self._contexts) >= app.contexts_per_connection:
                raise ProtocolError(
                    "busy",
                    f"connection limit: {app.contexts_per_connection} open contexts on one "
                    "connection; flush or cancel one first",
                    context_id,
                )
            if len(msg.text) > app.config.max_text_chars:
                raise _too_long(context_id, app.config.max_text_chars)
            voice = app.resolve_voice(msg.voice_id, context_id)
            streaming = app.config.streaming if msg.streaming is None else msg.streaming
            params = app.synthesis_params(msg, context_id, streaming)
            ctx = Context(context_id, msg, params, voice, app)
            self._contexts[context_id] = ctx
            app.contexts.add(ctx)
            app.metrics.contexts_open.inc()
            ctx.start()
            self._delivery.put_nowait(ctx)
        elif ctx.text_complete:
            raise ProtocolError(
                "invalid_request", f"context '{context_id}' was flushed; open a new one", context_id
            )
        elif ctx.text_chars + len(msg.text) > app.config.max_text_chars:
            await self._end_with_error(ctx, _too_long(context_id, app.config.max_text_chars))
            return
        app.metrics.characters.inc(len(msg.text))
        try:
            await ctx.add_text(msg.text)
            if not msg.continue_:
                await ctx.close_text()
        except ProtocolError as e:
            await self._end_with_error(ctx, e)

    async def _end_with_error(self, ctx: Context, error: ProtocolError) -> None:
        ctx.cancel()
        if ctx is self._current:
            ctx.audio.put_nowait(_Failed(error.code, error.message))
        else:
            self._finish(ctx, "error")
            await self.send_json(protocol.error(error.code, error.message, ctx.context_id))

    async def _cancel(self, context_id: str) -> None:
        ctx = self._contexts.get(context_id)
        if ctx is None:
            await self.send_json(protocol.cancelled(context_id))  # idempotent: unknown or ended
            return
        ctx.cancel()
        if ctx is self._current:
            ctx.audio.put_nowait(_Failed("cancelled", ""))  # delivery answers and moves on
        else:
            self._finish(ctx, "cancelled")
            await self.send_json(protocol.cancelled(context_id))

    def _finish(self, ctx: Context, outcome: str) -> None:
        if self._contexts.pop(ctx.context_id, None) is None:
            return
        self._ended[ctx.context_id] = None
        self._app.contexts.discard(ctx)
        while len(self._ended) > ENDED_IDS_REMEMBERED:
            self._ended.popitem(last=False)
        metrics = self._app.metrics
        metrics.contexts_open.dec()
        metrics.contexts.labels(outcome).inc()

    async def _deliver(self) -> None:
        while True:
            ctx = await self._delivery.get()
            if ctx.cancelled:
                continue
            self._current = ctx
            try:
                await self._deliver_one(ctx)
            finally:
                self._current = None

    async def _deliver_one(self, ctx: Context) -> None:
        bytes_per_sample = BYTES_PER_SAMPLE[ctx.request.encoding]
        started = False
        sent_bytes = 0
        ttfb_ms: float | None = None
        playback = Playback(bytes_per_sample * ctx.request.sample_rate)
        while True:
            item = await ctx.audio.get()
            if isinstance(item, _Failed):
                if item.code == "cancelled":
                    self._finish(ctx, "cancelled")
                    await self.send_json(protocol.cancelled(ctx.context_id))
                else:
                    if item.engine_fault:
                        self._app.record_engine_outcome(item.message)
                    self._finish(ctx, "error")
                    await self.send_json(protocol.error(item.code, item.message, ctx.context_id))
                return
            if ctx.cancelled:
                continue  # a chunk taken just before the cancel: the cancel marker follows
            if not started:
                started = True
                await self.send_json(
                    protocol.started(
                        ctx.context_id,
                        ctx.request,
                        ctx.params.streaming,
                        not_applied=self._app.engine.info.not_applied(),
                        word_timestamps=ctx.params.word_timestamps,
                        language=ctx.params.language,
                    )
                )
            if isinstance(item, _End):
                break
            if isinstance(item, _Words):
                await self.send_json(
                    protocol.timestamps(
                        ctx.context_id,
                        [w.word for w in item.words],
                        [w.start for w in item.words],
                        [w.end for w in item.words],
                    )
                )
                continue
            if ttfb_ms is None:
                ttfb_ms = (time.perf_counter() - ctx.opened_at) * 1000
                self._app.metrics.ttfa.observe(ttfb_ms / 1000)
            playback.sent(len(item), time.monotonic())
            await self._send_audio(ctx, item)
            sent_bytes += len(item)
        audio_seconds = sent_bytes / bytes_per_sample / ctx.request.sample_rate
        self._app.record_engine_outcome(None)
        self._finish(ctx, "done")
        metrics = self._app.metrics
        metrics.audio_seconds.inc(audio_seconds)
        metrics.underruns.inc(playback.underruns)
        metrics.underrun_seconds.inc(playback.underrun_seconds)
        if audio_seconds > 0:
            metrics.rtf.observe(ctx.generation_seconds / audio_seconds)
            if playback.underruns == 0:
                metrics.gap_free.inc()
        await self.send_json(protocol.done(ctx.context_id, audio_seconds, ttfb_ms))
        logger.debug(
            f"{self}: done {ctx.context_id} audio={audio_seconds:.2f}s ttfb={ttfb_ms or 0:.0f}ms "
            f"underruns={playback.underruns} underrun={playback.underrun_seconds:.3f}s "
            f"longest_gap={playback.longest_gap:.3f}s"
        )

    async def _send_audio(self, ctx: Context, data: bytes) -> None:
        """Send one audio frame; a client that does not take it in time is cut off."""
        try:
            await self._send_frame(data, "audio")
        except ConnectionAbortedError:
            ctx.cancel()
            self._finish(ctx, "error")
            raise

    async def _expire_idle_contexts(self) -> None:
        """End open contexts that got no text and no flush for ``TTS_CONTEXT_IDLE_SECONDS``."""
        limit = self._app.config.context_idle_seconds
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            for ctx in list(self._contexts.values()):
                if ctx.text_complete or ctx.cancelled or now - ctx.last_text_at < limit:
                    continue
                logger.info(f"{self}: context {ctx.context_id} idle for {limit:g} s; ending it")
                error = ProtocolError(
                    "timeout",
                    f"context '{ctx.context_id}' got no text and no flush for {limit:g} s "
                    "(TTS_CONTEXT_IDLE_SECONDS); send flush when its text is complete",
                    ctx.context_id,
                )
                try:
                    await self._end_with_error(ctx, error)
                except ConnectionAbortedError:
                    return

    async def _voice_operation(self, msg: RegisterVoice | DeleteVoice) -> None:
        try:
            if isinstance(msg, RegisterVoice):
                voice = await self._app.register_voice(msg.voice_id, msg.reference_audio)
                reply = {
                    "type": "voice_registered",
                    "voice_id": voice.voice_id,
                    "voice": voice.describe(),
                }
            else:
                await self._app.delete_voice(msg.voice_id)
                reply = {"type": "voice_deleted", "voice_id": msg.voice_id}
        except ProtocolError as e:
            reply = protocol.error(e.code, e.message)
            reply["voice_id"] = msg.voice_id
        await self.send_json(reply)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end_all(self, error: ProtocolError) -> None:
        """End every open context with ``error`` (the engine's device failed)."""
        for ctx in list(self._contexts.values()):
            try:
                await self._end_with_error(
                    ctx, ProtocolError(error.code, error.message, ctx.context_id)
                )
            except ConnectionAbortedError:
                return

    async def close(self) -> None:
        """Cancel every context and task of the connection (client gone or server closing)."""
        self._app.fault_listeners.discard(self._end_all)
        self._deliverer.cancel()
        self._watchdog.cancel()
        contexts = list(self._contexts.values())
        for ctx in contexts:
            ctx.cancel()
            self._finish(ctx, "cancelled")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(
            self._deliverer,
            self._watchdog,
            *self._tasks,
            *(c.wait_generation() for c in contexts),
            return_exceptions=True,
        )


_AUDIO_LIMIT = "the context's audio reached the limit of {:g} s"


def _too_long(context_id: str, limit: int) -> ProtocolError:
    return ProtocolError("text_too_long", f"context text exceeds {limit} characters", context_id)


def _describe(message: ClientMessage) -> str:
    if isinstance(message, Synthesize):
        return (
            f"synthesize context_id={message.context_id} continue={message.continue_} "
            f"voice_id={message.voice_id} exaggeration={message.exaggeration} "
            f"word_timestamps={message.word_timestamps} chars={len(message.text)}"
        )
    if isinstance(message, Flush | Cancel):
        return f"{type(message).__name__.lower()} context_id={message.context_id}"
    if isinstance(message, RegisterVoice | DeleteVoice):
        return f"{type(message).__name__} voice_id={message.voice_id}"
    return type(message).__name__
