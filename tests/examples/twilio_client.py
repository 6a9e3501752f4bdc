"""A fake Twilio Media Streams client: the phone side of a call, over a real websocket.

It speaks Twilio's wire format (``connected``, ``start``, ``media`` with base64 8 kHz mu-law,
``stop``) the way Twilio does: once the stream starts, it sends a 20 ms ``media`` frame every
20 ms for the whole call, silence when the caller says nothing. Everything the bot sends back is
recorded with its arrival time.
"""

from __future__ import annotations

import asyncio
import audioop
import base64
import io
import json
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
from websockets.asyncio.client import ClientConnection, connect

RATE = 8000
FRAME_SECONDS = 0.02
FRAME_BYTES = int(RATE * FRAME_SECONDS)  # mu-law: one byte per sample
ULAW_SILENCE = b"\xff" * FRAME_BYTES


def wav_to_ulaw(wav: bytes, trim_db: float = -45.0) -> bytes:
    """Convert a 16-bit 8 kHz mono WAV to mu-law bytes, without leading or trailing silence.

    Trimming makes the end of the bytes the end of the speech, which is where a turn's latency
    is measured from.
    """
    audio, rate = sf.read(io.BytesIO(wav), dtype="int16")
    assert rate == RATE, f"caller audio must be {RATE} Hz, got {rate}"
    loud = np.flatnonzero(np.abs(audio.astype(np.float32)) / 32768.0 > 10 ** (trim_db / 20))
    audio = audio[loud[0] : loud[-1] + 1] if loud.size else audio[:0]
    return audioop.lin2ulaw(audio.tobytes(), 2)


def ulaw_to_pcm(ulaw: bytes) -> np.ndarray:
    """Decode mu-law bytes to int16 samples."""
    return np.frombuffer(audioop.ulaw2lin(ulaw, 2), dtype=np.int16)


@dataclass
class Utterance:
    """One thing the caller said: when its first and last frames went out."""

    ulaw: bytes
    started: float | None = None
    ended: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Received:
    """One message from the bot, stamped with ``time.monotonic()`` on arrival."""

    at: float
    event: str
    message: dict
    audio: bytes = b""


class FakeTwilioCall:
    """One call to a bot's ``/ws`` endpoint, as Twilio would place it."""

    def __init__(self, url: str, *, stream_sid: str = "MZ0123", call_sid: str = "CA0123"):
        self.url = url
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self.received: list[Received] = []
        self._ws: ClientConnection | None = None
        self._queue: deque[Utterance] = deque()
        self._tasks: list[asyncio.Task] = []
        self._sequence = 0
        self._chunk = 0
        self._news = asyncio.Event()

    async def __aenter__(self) -> FakeTwilioCall:
        self._ws = await connect(self.url, open_timeout=60, max_size=None)
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send(
            {
                "event": "start",
                "start": {
                    "accountSid": "AC0123",
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
                    "customParameters": {},
                },
                "streamSid": self.stream_sid,
            }
        )
        self._tasks = [
            asyncio.create_task(self._send_media(), name="send"),
            asyncio.create_task(self._receive(), name="receive"),
        ]
        return self

    async def __aexit__(self, *exc) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ws is not None:
            try:
                await self._send({"event": "stop", "stop": {"callSid": self.call_sid}})
            except Exception:
                pass
            await self._ws.close()

    async def _send(self, message: dict) -> None:
        self._sequence += 1
        message = {**message, "sequenceNumber": str(self._sequence)}
        assert self._ws is not None
        await self._ws.send(json.dumps(message))

    async def _send_media(self) -> None:
        """Send one 20 ms frame every 20 ms, on a fixed clock: speech when queued, else silence."""
        current: Utterance | None = None
        offset = 0
        next_at = time.monotonic()
        while True:
            if current is None and self._queue:
                current, offset = self._queue.popleft(), 0
            if current is not None:
                payload = current.ulaw[offset : offset + FRAME_BYTES]
                payload += ULAW_SILENCE[: FRAME_BYTES - len(payload)]
                if offset == 0:
                    current.started = time.monotonic()
                offset += FRAME_BYTES
            else:
                payload = ULAW_SILENCE
            self._chunk += 1
            await self._send(
                {
                    "event": "media",
                    "streamSid": self.stream_sid,
                    "media": {
                        "track": "inbound",
                        "chunk": str(self._chunk),
                        "timestamp": str(self._chunk * 20),
                        "payload": base64.b64encode(payload).decode(),
                    },
                }
            )
            if current is not None and offset >= len(current.ulaw):
                # The frame carrying the last speech sample has just gone out.
                current.ended = time.monotonic()
                current.done.set()
                current = None
            next_at += FRAME_SECONDS
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _receive(self) -> None:
        assert self._ws is not None
        async for raw in self._ws:
            now = time.monotonic()
            message = json.loads(raw)
            event = message.get("event", "")
            audio = b""
            if event == "media":
                audio = base64.b64decode(message["media"]["payload"])
            self.received.append(Received(now, event, message, audio))
            self._news.set()

    def say(self, ulaw: bytes) -> Utterance:
        """Queue caller speech; it starts on the next 20 ms frame."""
        utterance = Utterance(ulaw)
        self._queue.append(utterance)
        return utterance

    def media_after(self, start: float, end: float = float("inf")) -> list[Received]:
        """The bot's ``media`` messages that arrived in ``[start, end)``."""
        return [r for r in self.received if r.event == "media" and start <= r.at < end]

    def events_after(self, event: str, start: float) -> list[Received]:
        """The bot's messages of one event type that arrived at or after ``start``."""
        return [r for r in self.received if r.event == event and r.at >= start]

    async def wait_for(self, event: str, after: float, timeout: float) -> Received:
        """Wait for the first message of ``event`` arriving at or after ``after``."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.events_after(event, after)
            if found:
                return found[0]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {event!r} from the bot within {timeout} s")
            self._news.clear()
            try:
                await asyncio.wait_for(self._news.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_quiet(self, quiet: float, timeout: float) -> float:
        """Wait until the bot has sent no ``media`` for ``quiet`` seconds; return that moment."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            media = [r.at for r in self.received if r.event == "media"]
            last = media[-1] if media else 0.0
            if time.monotonic() - last >= quiet:
                return last
            await asyncio.sleep(0.05)
        raise TimeoutError(f"the bot kept sending audio for {timeout} s")


def audio_of(messages: list[Received]) -> np.ndarray:
    """The int16 samples carried by a run of ``media`` messages."""
    return ulaw_to_pcm(b"".join(m.audio for m in messages))
