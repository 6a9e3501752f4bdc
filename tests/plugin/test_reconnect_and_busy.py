"""ChatterboxTTSService across a fleet: a connection lost mid-turn, and ``busy`` refusals.

Real piper sidecars; a lost connection is made by a TCP relay in front of the sidecar that
resets the connections it carries (what a sidecar's death looks like from the client, while
the "load balancer" address keeps answering). tests/deploy/test_haproxy.py does the same
through real HAProxy with a sidecar killed.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from pipecat.frames.frames import (
    ErrorFrame,
    InterruptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.utils.errors import ErrorCategory
from pipecat_chatterbox.client import BusyError, ConnectionLostError
from pipecat_chatterbox.retry import BusyBackoff

from tests.asr import transcribe, word_error_rate
from tests.client import TTSClient

from .helpers import (
    LivePipeline,
    RecordingChatterboxTTSService,
    audio_of,
    of_type,
    speak,
    stop_of,
)
from .test_speech import LONG_REPLY

RATE = 16000
AFTER = "I am still here and ready to help you."


class ResettingRelay:
    """A TCP relay to ``port`` on loopback that can reset every connection it carries."""

    def __init__(self, port: int):
        self._target = port
        self._server: asyncio.Server | None = None
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []

    async def start(self) -> ResettingRelay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._pairs.append((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def reset_all(self) -> None:
        """Abort every relayed connection on both sides (TCP RST, no close frame)."""
        for client_side, sidecar_side in self._pairs:
            client_side.transport.abort()
            sidecar_side.transport.abort()
        self._pairs.clear()

    async def close(self) -> None:
        self.reset_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def assert_says(audio, text: str) -> None:
    heard = transcribe(audio, RATE)
    assert word_error_rate(text, heard) <= 0.2, f"asked for {text!r}, heard {heard!r}"


def test_busy_backoff_is_exponential_jittered_and_bounded():
    backoff = BusyBackoff(attempts=6, timeout=60, min_wait=0.25, max_wait=2.0)
    waits = [backoff.next_wait() for _ in range(7)]
    caps = [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    for wait, cap in zip(waits, caps, strict=False):
        assert wait is not None and cap / 2 <= wait <= cap, (waits, caps)
    assert waits[6] is None and backoff.retries == 6
    draws = {BusyBackoff(5, 60, 1.0, 8.0).next_wait() for _ in range(20)}
    assert len(draws) > 1  # jittered, not one fixed value
    timed = BusyBackoff(attempts=100, timeout=0.05, min_wait=1.0, max_wait=1.0)
    assert timed.next_wait() <= 0.05  # never past the deadline
    time.sleep(0.06)
    assert timed.next_wait() is None


async def test_reset_connection_reports_the_cut_turn_once_and_the_next_turn_speaks(
    sidecar_factory,
):
    sidecar = sidecar_factory()
    relay = await ResettingRelay(sidecar.port).start()
    tts = RecordingChatterboxTTSService(url=f"ws://127.0.0.1:{relay.port}/v1/stream/tts")
    connects = asyncio.Queue()

    @tts.event_handler("on_connected")
    async def on_connected(_tts):
        connects.put_nowait(time.monotonic())

    live = LivePipeline(tts, PipelineParams(audio_out_sample_rate=RATE))
    try:
        await live.start()
        await asyncio.wait_for(connects.get(), 10)
        await live.send(TTSSpeakFrame(LONG_REPLY))
        first = await live.wait_for(lambda f: isinstance(f, TTSAudioRawFrame))

        # The connection is reset mid-reply: the reply ends (its audio so far plays) ...
        relay.reset_all()
        await live.wait_for(stop_of(first.context_id), timeout=5)
        # ... Pipecat's reconnect opens a new connection through the same address at once ...
        await asyncio.wait_for(connects.get(), 5)
        # ... and the next turn is spoken.
        await speak(live, AFTER)

        # An idle connection reset between turns loses nothing and reports nothing.
        relay.reset_all()
        await asyncio.wait_for(connects.get(), 5)
        last = await speak(live, "And once more, after a quiet reset.")
        await live.end()
    finally:
        await relay.close()

    errors = of_type(live.up, ErrorFrame)
    assert len(errors) == 1, [e.error for e in errors]
    (lost,) = errors
    assert isinstance(lost.exception, ConnectionLostError)
    assert lost.exception.context_id == first.context_id
    assert lost.category is ErrorCategory.CONNECTIVITY and not lost.category.is_permanent
    assert tts.is_usable
    assert len(of_type(live.down, TTSStartedFrame)) == len(of_type(live.down, TTSStoppedFrame))
    assert 0 < audio_of(live.down, first.context_id).size < 10 * RATE  # cut short
    after = [f.context_id for f in of_type(live.down, TTSStartedFrame)][1]
    assert_says(audio_of(live.down, after), AFTER)
    assert audio_of(live.down, last).size > 0


async def test_upgrade_refused_busy_waits_until_a_connection_frees(sidecar_factory):
    sidecar = sidecar_factory(TTS_MAX_CONNECTIONS="1")
    holder = await TTSClient.connect(sidecar.url)  # the sidecar's only connection
    tts = RecordingChatterboxTTSService(url=sidecar.url)
    live = LivePipeline(tts, PipelineParams(audio_out_sample_rate=RATE))
    await live.start()  # refused at setup: logged, not an error; the text connects again
    await live.send(TTSSpeakFrame(AFTER))
    started = await live.wait_for(lambda f: isinstance(f, TTSStartedFrame))
    await asyncio.sleep(1.5)  # refused (503 busy) and retried meanwhile
    assert not tts._is_connected()
    await holder.close()

    await live.wait_for(stop_of(started.context_id), timeout=30)
    await live.end()
    assert not of_type(live.up, ErrorFrame), [e.error for e in of_type(live.up, ErrorFrame)]
    assert_says(audio_of(live.down, started.context_id), AFTER)
    status, metrics, _ = sidecar.get("/metrics")
    assert status == 200
    rejected = [
        line
        for line in metrics.decode().splitlines()
        if line.startswith("tts_connections_rejected_total") and "max_connections" in line
    ]
    assert rejected and float(rejected[0].split()[-1]) >= 2, rejected  # setup and a retry


async def test_context_refused_busy_is_sent_again_once_a_stream_frees(sidecar_factory):
    sidecar = sidecar_factory(TTS_MAX_STREAMS="1")
    holder = await TTSClient.connect(sidecar.url)
    await holder.send(
        {"type": "synthesize", "text": "Hold on", "continue": True, "context_id": "held"}
    )  # holds the sidecar's only stream until its turn ends
    tts = RecordingChatterboxTTSService(url=sidecar.url)
    connects = []

    @tts.event_handler("on_connected")
    async def on_connected(_tts):
        connects.append(time.monotonic())

    live = LivePipeline(tts, PipelineParams(audio_out_sample_rate=RATE))
    await live.start()
    await live.send(TTSSpeakFrame(AFTER))
    started = await live.wait_for(lambda f: isinstance(f, TTSStartedFrame))
    # Refused and retried for longer than Pipecat lets a context go without audio (3 s) ...
    await asyncio.sleep(3.5)
    refusals = tts.received_of("error")
    assert len(refusals) >= 2 and {m["code"] for m in refusals} == {"busy"}, refusals
    with pytest.raises(TimeoutError):
        await live.wait_for(stop_of(started.context_id), timeout=0.1)
    # ... it still waits; the held turn ends, and the text is spoken.
    await holder.send({"type": "flush", "context_id": "held"})
    await live.wait_for(stop_of(started.context_id), timeout=30)
    await live.end()
    await holder.close()
    assert not of_type(live.up, ErrorFrame), [e.error for e in of_type(live.up, ErrorFrame)]
    assert_says(audio_of(live.down, started.context_id), AFTER)
    # The whole text went again, each time on a new connection (nothing else was open).
    sent = [m for m in tts.sent_of("synthesize") if m["context_id"] == started.context_id]
    assert len(sent) >= 2 and all(m["text"] == AFTER for m in sent), sent
    assert len(connects) >= len(sent)


async def test_busy_past_the_retry_budget_is_reported_once_and_the_service_stays_usable(
    sidecar_factory,
):
    sidecar = sidecar_factory(TTS_MAX_STREAMS="1")
    holder = await TTSClient.connect(sidecar.url)
    await holder.send(
        {"type": "synthesize", "text": "Hold on", "continue": True, "context_id": "held"}
    )
    tts = RecordingChatterboxTTSService(url=sidecar.url, busy_retry_timeout=1.0)
    live = LivePipeline(tts, PipelineParams(audio_out_sample_rate=RATE))
    await live.start()
    begin = time.monotonic()
    await live.send(TTSSpeakFrame("Nobody will hear this."))
    refused = await live.wait_for(lambda f: isinstance(f, TTSStartedFrame))
    await live.wait_for(stop_of(refused.context_id), timeout=10)
    waited = time.monotonic() - begin

    await holder.send({"type": "flush", "context_id": "held"})
    after = await speak(live, AFTER)
    await live.end()
    await holder.close()

    errors = of_type(live.up, ErrorFrame)
    assert len(errors) == 1, [e.error for e in errors]
    assert isinstance(errors[0].exception, BusyError)
    assert errors[0].exception.context_id == refused.context_id
    assert errors[0].category is ErrorCategory.RATE_LIMIT
    assert 0.5 < waited < 5, waited
    assert len(tts.received_of("error")) >= 2  # retried before giving up
    assert tts.is_usable
    assert not audio_of(live.down, refused.context_id).size
    assert_says(audio_of(live.down, after), AFTER)


async def test_interruption_while_waiting_for_capacity_drops_the_retry(sidecar_factory):
    sidecar = sidecar_factory(TTS_MAX_STREAMS="1")
    holder = await TTSClient.connect(sidecar.url)
    await holder.send(
        {"type": "synthesize", "text": "Hold on", "continue": True, "context_id": "held"}
    )
    tts = RecordingChatterboxTTSService(url=sidecar.url)
    live = LivePipeline(tts, PipelineParams(audio_out_sample_rate=RATE))
    await live.start()
    await live.send(TTSSpeakFrame("The user will talk over this."))
    refused = await live.wait_for(lambda f: isinstance(f, TTSStartedFrame))
    await asyncio.sleep(0.8)
    assert tts.received_of("error")  # refused, waiting for its retry
    await live.send(InterruptionFrame())
    await asyncio.sleep(0.2)
    interrupted_at = len(tts.sent)
    await holder.send({"type": "flush", "context_id": "held"})  # capacity frees ...
    after = await speak(live, AFTER)  # ... for the next turn only
    await asyncio.sleep(2.5)  # longer than any retry of the interrupted turn would wait
    await live.end()
    await holder.close()

    later = [m for m in tts.sent[interrupted_at:] if m.get("context_id") == refused.context_id]
    assert not later, later  # never sent again
    assert not of_type(live.up, ErrorFrame), [e.error for e in of_type(live.up, ErrorFrame)]
    assert not audio_of(live.down, refused.context_id).size
    assert_says(audio_of(live.down, after), AFTER)
