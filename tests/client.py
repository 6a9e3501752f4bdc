"""A small protocol-v1 client for tests, over a real websockets connection."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
from websockets.asyncio.client import ClientConnection, connect

DTYPES = {"pcm_f32le": "<f4", "pcm_s16le": "<i2", "pcm_mulaw": "u1"}


@dataclass
class ContextResult:
    """Everything a context produced, in arrival order."""

    context_id: str | None
    started: dict | None = None
    end: dict | None = None  # the done, cancelled or error message
    chunks: list[bytes] = field(default_factory=list)

    @property
    def audio_bytes(self) -> bytes:
        return b"".join(self.chunks)

    def audio(self) -> np.ndarray:
        """Decode the audio to float32 in [-1, 1]."""
        assert self.started is not None
        encoding = self.started["encoding"]
        raw = np.frombuffer(self.audio_bytes, dtype=DTYPES[encoding])
        if encoding == "pcm_f32le":
            return raw.astype(np.float32)
        if encoding == "pcm_s16le":
            return raw.astype(np.float32) / 32768.0
        import audioop

        pcm = np.frombuffer(audioop.ulaw2lin(raw.tobytes(), 2), dtype="<i2")
        return pcm.astype(np.float32) / 32768.0


class TTSClient:
    """Sends protocol messages and sorts what comes back by context."""

    def __init__(self, ws: ClientConnection):
        self.ws = ws
        self.ready: dict | None = None
        self.messages: list[dict | bytes] = []  # everything received, in order
        self.contexts: dict[str, ContextResult] = {}  # every context seen, by id
        self.current: ContextResult | None = None  # the context audio now belongs to

    @classmethod
    async def connect(cls, url: str, **kwargs) -> TTSClient:
        ws = await connect(url, max_size=None, **kwargs)
        client = cls(ws)
        client.ready = await client.recv_json()
        assert client.ready["type"] == "ready", client.ready
        return client

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> TTSClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def send(self, message: dict | str | bytes) -> None:
        if isinstance(message, dict):
            message = json.dumps(message)
        await self.ws.send(message)

    async def recv(self, timeout: float = 60) -> dict | bytes:
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        item = frame if isinstance(frame, bytes) else json.loads(frame)
        self.messages.append(item)
        self._track(item)
        return item

    def _track(self, item: dict | bytes) -> None:
        """Attribute audio to contexts, checking the protocol's ordering rules."""
        if isinstance(item, bytes):
            assert self.current is not None, "binary frame outside any started context"
            self.current.chunks.append(item)
            return
        kind = item["type"]
        cid = item.get("context_id")
        if kind == "started":
            assert self.current is None, f"started {cid} while {self.current.context_id} is open"
            assert cid not in self.contexts or self.contexts[cid].started is None
            self.current = self.contexts.setdefault(cid, ContextResult(cid))
            self.current.started = item
        elif kind in ("done", "cancelled") or (kind == "error" and cid is not None):
            result = self.contexts.setdefault(cid, ContextResult(cid))
            if kind == "done":
                assert result is self.current, f"done for {cid}, which is not the current context"
            result.end = result.end or item
            if self.current is result:
                self.current = None

    async def recv_json(self, timeout: float = 60) -> dict:
        item = await self.recv(timeout)
        assert isinstance(item, dict), f"expected JSON, got {len(item)} binary bytes"
        return item

    async def request(self, message: dict, reply_type: str | tuple[str, ...]) -> dict:
        """Send a message and wait for the first JSON reply of a type, skipping audio."""
        types = (reply_type,) if isinstance(reply_type, str) else reply_type
        await self.send(message)
        while True:
            item = await self.recv()
            if isinstance(item, dict) and item["type"] in types:
                return item

    async def register_voice(self, voice_id: str, wav: bytes | tuple[np.ndarray, int]) -> dict:
        """Register a voice; returns the reply, ``voice_registered`` or ``error``.

        Args:
            voice_id: The voice's id.
            wav: The reference as file bytes, or as ``(samples, rate)`` sent as a WAV file.
        """
        if isinstance(wav, tuple):
            buf = io.BytesIO()
            sf.write(buf, wav[0], wav[1], format="WAV")
            wav = buf.getvalue()
        return await self.request(
            {
                "type": "register_voice",
                "voice_id": voice_id,
                "reference_audio": base64.b64encode(wav).decode(),
            },
            ("voice_registered", "error"),
        )

    async def synthesize(self, text: str, **fields) -> ContextResult:
        """Synthesize one whole text and collect its context.

        A request the server refuses before it opens a context (a text with a NUL, say) is
        answered by an ``error`` naming no context when the request named none: that error
        ends this request too (its result's ``context_id`` is None).
        """
        await self.send({"type": "synthesize", "text": text, **fields})
        results = await self.collect(1, contextless_error_ends=fields.get("context_id") is None)
        return next(iter(results.values()))

    async def collect(
        self, n_contexts: int, timeout: float = 120, contextless_error_ends: bool = False
    ) -> dict[str, ContextResult]:
        """Receive until n more contexts have ended; returns the contexts that ended.

        Args:
            n_contexts: Contexts to wait for.
            timeout: Seconds to wait for each message.
            contextless_error_ends: An ``error`` without ``context_id`` counts as one ended
                context (the refusal of a request that named none).
        """
        ended: dict[str, ContextResult] = {}
        while len(ended) < n_contexts:
            item = await self.recv(timeout)
            if contextless_error_ends and isinstance(item, dict) and item["type"] == "error":
                if item.get("context_id") is None:
                    ended[f"refused-{len(ended)}"] = ContextResult(None, end=item)
                    continue
            if isinstance(item, dict) and item.get("context_id") in self.contexts:
                result = self.contexts[item["context_id"]]
                if result.end is item:
                    ended[result.context_id] = result
        return ended
