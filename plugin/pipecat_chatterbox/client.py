"""A client for the chatterbox sidecar, for callers outside Pipecat.

It speaks protocol v1 (``docs/protocol.md``) over one websocket and needs only the package's
core dependencies (``websockets``, ``numpy``, ``loguru``)::

    from pipecat_chatterbox.client import ChatterboxClient

    async with ChatterboxClient("ws://localhost:8002/v1/stream/tts") as tts:
        speech = await tts.synthesize("Hello there.", sample_rate=16000)
        async for chunk in tts.stream("A longer story...", encoding="pcm_s16le"):
            play(chunk.data)
        await tts.register_voice("alice", "alice.wav")

Every failure the sidecar reports is raised as a :class:`ChatterboxError` subclass carrying the
protocol's error code. :class:`SyncChatterboxClient` offers the same calls to code without an
event loop.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import re
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from loguru import logger
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

DEFAULT_URL = "ws://localhost:8002/v1/stream/tts"
ENCODINGS = ("pcm_f32le", "pcm_s16le", "pcm_mulaw")
BYTES_PER_SAMPLE = {"pcm_f32le": 4, "pcm_s16le": 2, "pcm_mulaw": 1}

# The protocol's id rules (docs/protocol.md), checked here so that a bad id is refused before it
# is sent: the sidecar's answer to a message it cannot parse names no voice or context.
VOICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CONTEXT_ID_PATTERN = re.compile(r"^[\x21-\x7e]{1,128}$")

# Largest frame accepted from the sidecar (a long voice list); audio frames are far smaller.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

T = TypeVar("T")


#
# Errors
#


class ChatterboxError(Exception):
    """An error the sidecar reported, or a failure to reach it.

    Parameters:
        code: The protocol's error code (``voice_not_found``, ``busy``, ...), or one of the
            client's own: ``unauthorized``, ``connection_failed``, ``connection_closed``.
        message: The human-readable explanation.
        context_id: The context the error ended, if it concerned one.
        voice_id: The voice the error concerned, if any.
    """

    def __init__(
        self,
        code: str,
        message: str,
        context_id: str | None = None,
        voice_id: str | None = None,
    ):
        """Initialize the error.

        Args:
            code: The error code.
            message: The human-readable explanation.
            context_id: The context the error ended, if any.
            voice_id: The voice the error concerned, if any.
        """
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.context_id = context_id
        self.voice_id = voice_id


class AuthenticationError(ChatterboxError):
    """The sidecar refused the API key (HTTP 401 or 403 on the upgrade)."""


class ConnectionFailedError(ChatterboxError, ConnectionError):
    """The sidecar could not be reached, or did not complete the websocket handshake."""


class ConnectionLostError(ChatterboxError, ConnectionError):
    """The connection closed while a request was waiting for its answer."""


class NotReadyError(ChatterboxError):
    """The sidecar's engine is still loading (``not_ready``)."""


class BusyError(ChatterboxError):
    """The sidecar is at capacity or shutting down (``busy``): retry later or elsewhere."""


class VoiceNotFoundError(ChatterboxError):
    """The voice is not registered (``voice_not_found``)."""


class InvalidAudioError(ChatterboxError):
    """A reference recording was refused (``invalid_audio``): not a WAV of 3 to 30 seconds."""


class UnsupportedError(ChatterboxError):
    """The engine cannot do this (``unsupported``), e.g. a cloned voice on piper."""


class TextTooLongError(ChatterboxError):
    """A context's text exceeds the sidecar's ``max_text_chars`` (``text_too_long``)."""


class InvalidRequestError(ChatterboxError):
    """The sidecar rejected a message (``invalid_request``, ``invalid_json``, ``unknown_type``)."""


class EngineFailedError(ChatterboxError):
    """The engine failed on this context (``engine_error``, ``internal_error``)."""


ERROR_TYPES: dict[str, type[ChatterboxError]] = {
    "unauthorized": AuthenticationError,
    "connection_failed": ConnectionFailedError,
    "connection_closed": ConnectionLostError,
    "not_ready": NotReadyError,
    "busy": BusyError,
    "voice_not_found": VoiceNotFoundError,
    "invalid_audio": InvalidAudioError,
    "unsupported": UnsupportedError,
    "text_too_long": TextTooLongError,
    "invalid_request": InvalidRequestError,
    "invalid_json": InvalidRequestError,
    "unknown_type": InvalidRequestError,
    "engine_error": EngineFailedError,
    "internal_error": EngineFailedError,
}


def error_for(
    code: str, message: str, context_id: str | None = None, voice_id: str | None = None
) -> ChatterboxError:
    """Build the typed error for a code.

    Args:
        code: The error code.
        message: The human-readable explanation.
        context_id: The context the error ended, if any.
        voice_id: The voice the error concerned, if any.

    Returns:
        An instance of the code's class in ``ERROR_TYPES``, or of :class:`ChatterboxError`
        for a code this client does not know.
    """
    return ERROR_TYPES.get(code, ChatterboxError)(code, message, context_id, voice_id)


def error_from_message(message: dict[str, Any]) -> ChatterboxError:
    """Build the typed error for a sidecar ``error`` message.

    Args:
        message: The message.

    Returns:
        The error, carrying the message's code, context id and voice id.
    """
    return error_for(
        str(message.get("code", "unknown")),
        str(message.get("message", "")),
        message.get("context_id"),
        message.get("voice_id"),
    )


#
# Results
#


@dataclass(frozen=True)
class ServerInfo:
    """What the sidecar announced in its ``ready`` message."""

    engine: str
    version: str
    protocol: int
    sample_rate: int
    native_sample_rate: int
    encodings: tuple[str, ...]
    can_clone: bool
    streaming_default: bool
    voices: tuple[str, ...]
    limits: dict[str, Any]

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> ServerInfo:
        """Read a ``ready`` message.

        Args:
            message: The message.

        Returns:
            The server's description.
        """
        return cls(
            engine=str(message.get("engine", "")),
            version=str(message.get("version", "")),
            protocol=int(message.get("protocol", 1)),
            sample_rate=int(message.get("sample_rate", 24000)),
            native_sample_rate=int(message.get("native_sample_rate", 0)),
            encodings=tuple(message.get("encodings", ENCODINGS)),
            can_clone=bool(message.get("can_clone", False)),
            streaming_default=bool(message.get("streaming_default", True)),
            voices=tuple(message.get("voices", ())),
            limits=dict(message.get("limits", {})),
        )


@dataclass(frozen=True)
class AudioChunk:
    """One binary frame of a context's audio.

    Parameters:
        context_id: The context it belongs to.
        data: Raw audio, no header.
        sample_rate: Its rate in Hz.
        encoding: ``pcm_f32le``, ``pcm_s16le`` or ``pcm_mulaw``.
    """

    context_id: str
    data: bytes
    sample_rate: int
    encoding: str

    @property
    def duration(self) -> float:
        """Returns: the chunk's length in seconds."""
        return len(self.data) / BYTES_PER_SAMPLE[self.encoding] / self.sample_rate

    def samples(self) -> np.ndarray:
        """Returns: the audio as float32 samples in [-1, 1]."""
        return decode_pcm(self.data, self.encoding)


@dataclass(frozen=True)
class Synthesis:
    """The whole audio of one context.

    Parameters:
        context_id: The context.
        audio: Raw audio, no header.
        sample_rate: Its rate in Hz.
        encoding: ``pcm_f32le``, ``pcm_s16le`` or ``pcm_mulaw``.
        audio_seconds: Its duration, as the sidecar counted it.
        ttfb_ms: The sidecar's time from the text to the first audio byte (None without audio).
        cancelled: Whether the context was cancelled (the audio is then what came before).
        parameters: The voice and generation parameters the sidecar echoed in ``started``.
    """

    context_id: str
    audio: bytes
    sample_rate: int
    encoding: str
    audio_seconds: float
    ttfb_ms: float | None = None
    cancelled: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)

    def samples(self) -> np.ndarray:
        """Returns: the audio as float32 samples in [-1, 1]."""
        return decode_pcm(self.audio, self.encoding)


def decode_pcm(data: bytes, encoding: str) -> np.ndarray:
    """Decode raw protocol audio to float32 samples.

    Args:
        data: The bytes.
        encoding: ``pcm_f32le``, ``pcm_s16le`` or ``pcm_mulaw`` (G.711).

    Returns:
        Mono float32 samples in [-1, 1].
    """
    if encoding == "pcm_f32le":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if encoding == "pcm_s16le":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if encoding == "pcm_mulaw":
        u = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
        magnitude = ((((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)) - 0x84
        return (np.where(u & 0x80, -magnitude, magnitude) / 32768.0).astype(np.float32)
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")


def health_url(url: str) -> str:
    """The ``/health`` address of the sidecar behind a websocket URL.

    Args:
        url: The websocket URL (``ws://`` or ``wss://``).

    Returns:
        The same host and port over ``http``/``https`` with the path ``/health``.
    """
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "/health", "", ""))


def _check_voice_id(voice_id: str) -> None:
    if not isinstance(voice_id, str) or not VOICE_ID_PATTERN.match(voice_id):
        raise InvalidRequestError(
            "invalid_request",
            f"voice id {voice_id!r} must be 1-64 characters of letters, digits, '_' or '-'",
            voice_id=voice_id if isinstance(voice_id, str) else None,
        )


#
# The asyncio client
#


class _End:
    """The end of a context's stream: done, cancelled or failed."""

    def __init__(self, message: dict[str, Any] | None, error: BaseException | None = None):
        self.message = message
        self.error = error


class SpeechContext:
    """One context on the sidecar: an utterance whose audio arrives as it is generated.

    Made by :meth:`ChatterboxClient.open_context`. Iterate it for :class:`AudioChunk` objects;
    the iteration ends after the sidecar's ``done`` or ``cancelled`` and raises the
    :class:`ChatterboxError` of an ``error`` that ends the context.

    Parameters:
        context_id: The context's id.
        parameters: The ``started`` message (voice, rate, encoding, generation parameters), once
            its audio has begun.
        audio_seconds: The sidecar's count of audio seconds, after ``done``.
        ttfb_ms: The sidecar's time to first audio byte, after ``done``.
        cancelled: Whether the context ended by a cancel.
    """

    def __init__(self, client: ChatterboxClient, context_id: str):
        self.context_id = context_id
        self.parameters: dict[str, Any] | None = None
        self.audio_seconds: float | None = None
        self.ttfb_ms: float | None = None
        self.cancelled = False
        self._client = client
        self._items: asyncio.Queue[AudioChunk | _End] = asyncio.Queue()
        self._end: _End | None = None  # set when the end is queued
        self._finished = False  # set when the consumer has reached the end
        self._sender: asyncio.Task | None = None

    @property
    def ended(self) -> bool:
        """Returns: whether the sidecar has ended the context (its audio may still be queued)."""
        return self._end is not None

    def __aiter__(self) -> SpeechContext:
        return self

    async def __anext__(self) -> AudioChunk:
        if self._finished:
            raise StopAsyncIteration
        item = await self._items.get()
        if isinstance(item, AudioChunk):
            return item
        self._finished = True
        if item.error is not None:
            raise item.error
        raise StopAsyncIteration

    async def cancel(self) -> None:
        """Stop the context at once; the iteration then ends without further audio."""
        if not self.ended:
            await self._client.cancel(self.context_id)

    async def collect(self) -> Synthesis:
        """Wait for the rest of the audio.

        Returns:
            The whole audio (what came before a cancel, if the context was cancelled).

        Raises:
            ChatterboxError: The error that ended the context.
        """
        data = bytearray()
        async for chunk in self:
            data += chunk.data
        params = self.parameters or {}
        encoding = params.get("encoding", "pcm_f32le")
        sample_rate = int(params.get("sample_rate", 24000))
        return Synthesis(
            context_id=self.context_id,
            audio=bytes(data),
            sample_rate=sample_rate,
            encoding=encoding,
            audio_seconds=(
                self.audio_seconds
                if self.audio_seconds is not None
                else len(data) / BYTES_PER_SAMPLE[encoding] / sample_rate
            ),
            ttfb_ms=self.ttfb_ms,
            cancelled=self.cancelled,
            parameters=params,
        )

    def _chunk(self, data: bytes) -> None:
        params = self.parameters or {}
        self._items.put_nowait(
            AudioChunk(
                self.context_id,
                data,
                int(params.get("sample_rate", 24000)),
                params.get("encoding", "pcm_f32le"),
            )
        )

    def _finish(self, message: dict[str, Any] | None, error: BaseException | None = None) -> None:
        if self._end is not None:
            return
        if message is not None and message.get("type") == "done":
            self.audio_seconds = message.get("audio_seconds")
            self.ttfb_ms = message.get("ttfb_ms")
        self.cancelled = message is not None and message.get("type") == "cancelled"
        self._end = _End(message, error)
        self._items.put_nowait(self._end)
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()


# Replies that answer each voice request.
REPLY_TYPES = {
    "register_voice": "voice_registered",
    "delete_voice": "voice_deleted",
    "list_voices": "voices",
}


def answer_voice_request(
    pending: list[tuple[dict[str, Any], asyncio.Future]],
    message: dict[str, Any],
    error: BaseException | None,
) -> bool:
    """Resolve the pending voice request that a reply (or an ``error``) answers.

    The sidecar runs voice operations concurrently, so replies are matched by kind and voice
    id rather than by order; an error answers the first request for its voice (any request
    when it names none). The request is removed from ``pending``.

    Args:
        pending: (request message, future) of each request waiting, oldest first.
        message: The reply.
        error: The error the reply carries, or None.

    Returns:
        Whether a waiting request took the reply.
    """
    voice_id = message.get("voice_id")
    for i, (request, future) in enumerate(pending):
        same_voice = voice_id is None or request.get("voice_id") == voice_id
        if error is None:
            matches = same_voice and REPLY_TYPES.get(request["type"]) == message.get("type")
        else:
            matches = same_voice
        if matches:
            del pending[i]
            if not future.done():
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(message)
            return True
    return False


class ChatterboxClient:
    """An asyncio client for one chatterbox sidecar, over one websocket.

    The connection opens on first use (or with :meth:`connect`) and reopens on the next call
    after it is lost. Several contexts may be open at once; the sidecar delivers their audio in
    the order they were opened.

    Args:
        url: The sidecar's websocket URL.
        api_key: The sidecar's ``TTS_API_KEY``, if it has one.
        open_timeout: Seconds to wait for the connection and the ``ready`` message.
        request_timeout: Seconds to wait for the answer to a voice request or health check.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        open_timeout: float = 10.0,
        request_timeout: float = 30.0,
    ):
        """Initialize the client (nothing is connected yet)."""
        self.url = url
        self._api_key = api_key
        self._open_timeout = open_timeout
        self._request_timeout = request_timeout
        self._ws: ClientConnection | None = None
        self._info: ServerInfo | None = None
        self._receiver: asyncio.Task | None = None
        self._connect_lock = asyncio.Lock()
        self._contexts: dict[str, SpeechContext] = {}
        self._delivering: SpeechContext | None = None
        self._voice_requests: list[tuple[dict[str, Any], asyncio.Future]] = []
        self._background: set[asyncio.Task] = set()

    def __repr__(self) -> str:
        return f"ChatterboxClient({self.url!r})"

    async def __aenter__(self) -> ChatterboxClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def info(self) -> ServerInfo | None:
        """Returns: the sidecar's ``ready`` announcement, once connected."""
        return self._info

    @property
    def connected(self) -> bool:
        """Returns: whether the websocket is open."""
        return self._ws is not None and self._receiver is not None and not self._receiver.done()

    #
    # Connection
    #

    async def connect(self) -> ServerInfo:
        """Open the websocket (if it is not open) and read the sidecar's ``ready`` message.

        Returns:
            What the sidecar announced.

        Raises:
            AuthenticationError: The sidecar refused the API key.
            BusyError: The sidecar is at its connection limit or shutting down.
            NotReadyError: The engine is still loading.
            ConnectionFailedError: The sidecar cannot be reached.
            ValueError: The URL is not a websocket URL.
        """
        async with self._connect_lock:
            if self.connected:
                assert self._info is not None
                return self._info
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            try:
                async with asyncio.timeout(self._open_timeout):
                    ws = await connect(
                        self.url,
                        additional_headers=headers,
                        max_size=MAX_MESSAGE_BYTES,
                        compression=None,
                        open_timeout=None,
                    )
                    try:
                        ready = json.loads(await ws.recv())
                    except BaseException:
                        await ws.close()
                        raise
            except InvalidURI as e:
                raise ValueError(f"{self.url!r} is not a websocket URL (ws://...): {e}") from None
            except InvalidStatus as e:
                raise self._refusal(e) from None
            except (OSError, InvalidHandshake, ConnectionClosed, ValueError) as e:
                # TimeoutError is an OSError; ValueError: a ready message that is not JSON
                reason = str(e) or type(e).__name__
                if isinstance(e, TimeoutError):
                    reason = f"no answer within {self._open_timeout:g} s"
                raise ConnectionFailedError(
                    "connection_failed", f"cannot connect to the sidecar at {self.url}: {reason}"
                ) from e
            if not isinstance(ready, dict) or ready.get("type") != "ready":
                await ws.close()
                raise ConnectionFailedError(
                    "connection_failed",
                    f"{self.url} is not a chatterbox sidecar (no 'ready' message)",
                )
            self._ws = ws
            self._info = ServerInfo.from_message(ready)
            self._receiver = asyncio.create_task(self._receive(ws), name="chatterbox-client-recv")
            logger.debug(f"{self}: connected to {self._info.engine} {self._info.version}")
            return self._info

    def _refusal(self, e: InvalidStatus) -> ChatterboxError:
        status = e.response.status_code
        if status in (401, 403):
            return AuthenticationError(
                "unauthorized",
                f"the sidecar at {self.url} refused the API key (HTTP {status}); "
                "pass the sidecar's TTS_API_KEY as the API key",
            )
        try:
            body = json.loads(e.response.body or b"{}")
        except ValueError:
            body = {}
        if isinstance(body, dict) and body.get("type") == "error":
            return error_from_message(body)
        return ConnectionFailedError(
            "connection_failed", f"the sidecar at {self.url} answered HTTP {status}"
        )

    async def close(self) -> None:
        """Close the websocket; open contexts and requests fail with ``ConnectionLostError``."""
        ws, receiver = self._ws, self._receiver
        if ws is not None:
            await ws.close()
        if receiver is not None:
            await asyncio.gather(receiver, return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        self._fail_pending(ConnectionLostError("connection_closed", "the client was closed"))

    async def _send(self, message: dict[str, Any]) -> None:
        await self.connect()
        ws = self._ws
        assert ws is not None
        try:
            await ws.send(json.dumps(message))
        except ConnectionClosed:
            raise self._lost(ws) from None

    def _lost(self, ws: ClientConnection | None) -> ConnectionLostError:
        code = ws.close_code if ws is not None else None
        reason = ws.close_reason if ws is not None else None
        detail = f" (code {code}{': ' + reason if reason else ''})" if code else ""
        return ConnectionLostError(
            "connection_closed", f"the connection to the sidecar at {self.url} closed{detail}"
        )

    #
    # Receiving
    #

    async def _receive(self, ws: ClientConnection) -> None:
        try:
            async for frame in ws:
                if isinstance(frame, bytes):
                    if self._delivering is not None:
                        self._delivering._chunk(frame)
                    else:  # audio of a context given up on, sent before the cancel arrived
                        logger.trace(f"{self}: dropping audio of no open context")
                    continue
                try:
                    message = json.loads(frame)
                except ValueError:
                    logger.warning(f"{self}: ignoring a frame that is not JSON: {frame[:80]!r}")
                    continue
                if isinstance(message, dict):
                    self._dispatch(message)
        except ConnectionClosed:
            pass
        finally:
            if self._ws is ws:
                self._ws = None
            self._fail_pending(self._lost(ws))

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        context_id = message.get("context_id")
        if kind == "started":
            ctx = self._contexts.get(context_id)
            self._delivering = ctx
            if ctx is not None:
                ctx.parameters = message
        elif kind in ("done", "cancelled"):
            self._end_context(context_id, message)
        elif kind == "error":
            error = error_from_message(message)
            if context_id is not None:
                self._end_context(context_id, message, error)
            else:
                self._answer_voice_request(message, error)
        elif kind in ("voice_registered", "voice_deleted", "voices"):
            self._answer_voice_request(message, None)
        elif kind == "ready":
            self._info = ServerInfo.from_message(message)
        else:
            logger.debug(f"{self}: ignoring a message of type {kind!r}")

    def _end_context(
        self, context_id: Any, message: dict[str, Any], error: ChatterboxError | None = None
    ) -> None:
        ctx = self._contexts.pop(context_id, None)
        if ctx is None:
            if error is not None:
                logger.debug(f"{self}: error for a context given up on: {error}")
            return
        if self._delivering is ctx:
            self._delivering = None
        ctx._finish(message, error)

    def _answer_voice_request(self, message: dict[str, Any], error: ChatterboxError | None):
        if not answer_voice_request(self._voice_requests, message, error) and error is not None:
            logger.warning(f"{self}: sidecar error answering no request: {error}")

    def _fail_pending(self, error: ChatterboxError) -> None:
        contexts = list(self._contexts.values())
        self._contexts.clear()
        self._delivering = None
        for ctx in contexts:
            ctx._finish(None, error)
        requests, self._voice_requests = self._voice_requests, []
        for _, future in requests:
            if not future.done():
                future.set_exception(error)

    #
    # Synthesis
    #

    async def open_context(
        self,
        text: str | AsyncIterable[str],
        *,
        context_id: str | None = None,
        voice_id: str | None = None,
        sample_rate: int | None = None,
        encoding: str | None = None,
        streaming: bool | None = None,
        exaggeration: float | None = None,
        cfg_weight: float | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> SpeechContext:
        """Open a context and start generating; iterate the result for its audio.

        Args:
            text: The text to speak, or an async iterable of pieces (LLM tokens, say) that are
                sent as they come, concatenated verbatim, and then flushed.
            context_id: The context's id (1-128 printable ASCII, no spaces); a new one by default.
            voice_id: A registered voice, or ``default`` (the sidecar's default when None).
            sample_rate: Rate of the audio sent back, 8000-48000 Hz (24000 when None).
            encoding: ``pcm_f32le``, ``pcm_s16le`` or ``pcm_mulaw`` (``pcm_f32le`` when None).
            streaming: False asks for batch generation (the sidecar's ``TTS_STREAMING`` when None).
            exaggeration: Emotion intensity, 0-2 (chatterbox).
            cfg_weight: Guidance weight, 0-2 (chatterbox).
            temperature: Sampling temperature, 0.05-5 (chatterbox).
            seed: A seed for reproducible sampling (chatterbox).

        Returns:
            The open context.

        Raises:
            InvalidRequestError: Empty text, or an id the protocol does not allow.
            ConnectionFailedError: The sidecar cannot be reached.
        """
        context_id = context_id or uuid.uuid4().hex
        if not CONTEXT_ID_PATTERN.match(context_id):
            raise InvalidRequestError(
                "invalid_request",
                f"context id {context_id!r} must be 1-128 printable ASCII characters, no spaces",
            )
        if voice_id is not None:
            _check_voice_id(voice_id)
        pieces = None if isinstance(text, str) else text
        if pieces is None and not text.strip():
            raise InvalidRequestError("invalid_request", "the text is empty")
        options = {
            "voice_id": voice_id,
            "sample_rate": sample_rate,
            "encoding": encoding,
            "streaming": streaming,
            "exaggeration": exaggeration,
            "cfg_weight": cfg_weight,
            "temperature": temperature,
            "seed": seed,
        }
        message = {
            "type": "synthesize",
            "text": "" if pieces is not None else text,
            "context_id": context_id,
            "continue": pieces is not None,
            **{k: v for k, v in options.items() if v is not None},
        }
        await self.connect()
        if context_id in self._contexts:
            raise InvalidRequestError(
                "invalid_request", f"context {context_id!r} is already open", context_id
            )
        ctx = SpeechContext(self, context_id)
        self._contexts[context_id] = ctx
        try:
            await self._send(message)
        except BaseException:
            self._contexts.pop(context_id, None)
            raise
        if pieces is not None:
            ctx._sender = asyncio.create_task(
                self._send_pieces(ctx, pieces), name=f"chatterbox-client-text-{context_id}"
            )
        return ctx

    async def _send_pieces(self, ctx: SpeechContext, pieces: AsyncIterable[str]) -> None:
        cid = ctx.context_id
        try:
            async for piece in pieces:
                if piece:
                    await self._send(
                        {"type": "synthesize", "text": piece, "context_id": cid, "continue": True}
                    )
            await self._send({"type": "flush", "context_id": cid})
        except asyncio.CancelledError:
            raise
        except ChatterboxError as e:
            self._end_context(cid, {}, e)
        except Exception as e:
            # The text source failed: stop the context and hand its error to the listener.
            logger.warning(f"{self}: the text for context {cid} failed: {e!r}")
            self._end_context(cid, {}, e)  # type: ignore[arg-type]
            self._cancel_soon(cid)

    async def stream(
        self, text: str | AsyncIterable[str], **options: Any
    ) -> AsyncIterator[AudioChunk]:
        """Speak text and yield its audio as it is generated.

        Leaving the loop early (``break``, an exception, task cancellation) cancels the context
        on the sidecar.

        Args:
            text: The text, or an async iterable of text pieces (see :meth:`open_context`).
            **options: The parameters of :meth:`open_context` (``voice_id``, ``sample_rate``,
                ``encoding``, ``context_id``, ...).

        Yields:
            The audio chunks, each carrying its context id, rate and encoding.

        Raises:
            ChatterboxError: The error that ended the context.
        """
        ctx = await self.open_context(text, **options)
        try:
            async for chunk in ctx:
                yield chunk
        finally:
            if not ctx.ended:
                self._cancel_soon(ctx.context_id)

    async def synthesize(self, text: str | AsyncIterable[str], **options: Any) -> Synthesis:
        """Speak text and return its whole audio.

        Args:
            text: The text, or an async iterable of text pieces (see :meth:`open_context`).
            **options: The parameters of :meth:`open_context`.

        Returns:
            The audio with its rate, encoding and the sidecar's timings.

        Raises:
            ChatterboxError: The error that ended the context (``voice_not_found``,
                ``unsupported``, ``text_too_long``, ``busy``, ...).
        """
        ctx = await self.open_context(text, **options)
        try:
            return await ctx.collect()
        finally:
            if not ctx.ended:
                self._cancel_soon(ctx.context_id)

    async def cancel(self, context_id: str) -> None:
        """Cancel a context: the sidecar stops generating it and sends no more of its audio.

        Cancelling an unknown or ended context does nothing. The context's iteration ends once
        the sidecar confirms.

        Args:
            context_id: The context.
        """
        if self.connected:
            await self._send({"type": "cancel", "context_id": context_id})

    def _cancel_soon(self, context_id: str) -> None:
        """Send a cancel without waiting: for clean-up in a task that is itself ending."""
        if not self.connected:
            return
        task = asyncio.get_running_loop().create_task(self._quiet_cancel(context_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _quiet_cancel(self, context_id: str) -> None:
        try:
            await self.cancel(context_id)
        except ChatterboxError as e:
            logger.debug(f"{self}: cancel of {context_id} not sent: {e}")

    #
    # Voices
    #

    async def voice_request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a voice message (``register_voice``, ``delete_voice``, ``list_voices``).

        The typed methods below are the usual way in; this one returns the sidecar's raw reply.

        Args:
            message: The protocol message.

        Returns:
            The sidecar's reply (``voice_registered``, ``voice_deleted`` or ``voices``).

        Raises:
            ChatterboxError: The sidecar's ``error`` answer, or a lost connection.
            TimeoutError: No answer within the request timeout.
        """
        if "voice_id" in message:
            _check_voice_id(message["voice_id"])
        await self.connect()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (message, future)
        self._voice_requests.append(entry)
        try:
            await self._send(message)
            async with asyncio.timeout(self._request_timeout):
                return await future
        finally:
            if entry in self._voice_requests:
                self._voice_requests.remove(entry)

    async def register_voice(self, voice_id: str, reference: str | Path | bytes) -> dict[str, Any]:
        """Register (or atomically replace) a voice from a reference recording.

        Args:
            voice_id: The id to register it under (``^[A-Za-z0-9_-]{1,64}$``; not ``default``).
            reference: Path to a WAV file of 3 to 30 seconds (any rate, mono or stereo), or
                the file's bytes.

        Returns:
            The stored voice as the sidecar lists it (``voice_id``, ``duration_s``, ...).

        Raises:
            InvalidAudioError: The recording is not a WAV of 3 to 30 seconds, or too large.
            InvalidRequestError: A bad or reserved voice id.
            OSError: The file cannot be read.
        """
        _check_voice_id(voice_id)
        if isinstance(reference, bytes):
            data = reference
        else:
            data = await asyncio.to_thread(Path(reference).read_bytes)
        encoded = base64.b64encode(data).decode("ascii")
        message = {"type": "register_voice", "voice_id": voice_id, "reference_audio": encoded}
        info = await self.connect()
        limit = info.limits.get("max_frame_bytes")
        if limit and len(encoded) + 100 > limit:
            # The sidecar would close the connection (1009) rather than answer.
            raise InvalidAudioError(
                "invalid_audio",
                f"the reference is {len(data)} bytes, too large for the sidecar's "
                f"{limit}-byte frames",
                voice_id=voice_id,
            )
        reply = await self.voice_request(message)
        return dict(reply.get("voice", {"voice_id": voice_id}))

    async def delete_voice(self, voice_id: str) -> None:
        """Delete a registered voice.

        Args:
            voice_id: The voice.

        Raises:
            VoiceNotFoundError: No such voice.
        """
        await self.voice_request({"type": "delete_voice", "voice_id": voice_id})

    async def list_voices(self) -> list[dict[str, Any]]:
        """List the sidecar's voices.

        Returns:
            One dict a voice: ``voice_id``, ``kind`` (``builtin`` or ``cloned``), ``usable``
            (whether this engine can speak it) and, for cloned voices, ``duration_s``,
            ``sample_rate``, ``channels``, ``created_at``.
        """
        reply = await self.voice_request({"type": "list_voices"})
        return list(reply.get("voices", []))

    #
    # Health
    #

    async def health(self) -> dict[str, Any]:
        """Read the sidecar's ``/health`` document (no API key needed).

        Returns:
            The document: ``status`` (``ready``, ``loading``, ``draining``, ``degraded`` or
            ``failed``), ``engine``, ``version``, ``uptime_s``, ``active_contexts``, ``error``.
            A sidecar that is not ready answers too, with its status.

        Raises:
            ConnectionFailedError: The sidecar cannot be reached or does not answer with JSON.
        """
        url = health_url(self.url)
        return await asyncio.to_thread(_get_json, url, self._request_timeout)


def _get_json(url: str, timeout: float) -> dict[str, Any]:
    # urllib in a thread: /health is one small GET, not worth an HTTP client dependency.
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        body = e.read()  # 503 while loading or draining still carries the document
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionFailedError(
            "connection_failed", f"cannot reach the sidecar at {url}: {reason}"
        ) from e
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise ConnectionFailedError("connection_failed", f"{url} did not answer with JSON")
    return document


#
# The blocking client
#


class SyncChatterboxClient:
    """The same calls as :class:`ChatterboxClient`, blocking, for code without an event loop.

    An event loop runs in a thread of its own for the client's lifetime, so the connection
    stays open (and answers the sidecar's pings) between calls. Close it when done, or use it
    as a context manager.

    Args:
        url: The sidecar's websocket URL.
        api_key: The sidecar's ``TTS_API_KEY``, if it has one.
        **kwargs: ``open_timeout`` and ``request_timeout``, as for :class:`ChatterboxClient`.
    """

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, **kwargs: Any):
        """Initialize the client and start its event loop thread."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="chatterbox-client", daemon=True
        )
        self._thread.start()
        self._client = ChatterboxClient(url, api_key, **kwargs)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C: stop the call on the loop too
            raise

    def __enter__(self) -> SyncChatterboxClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def info(self) -> ServerInfo:
        """Returns: the sidecar's ``ready`` announcement (connecting if needed)."""
        return self._run(self._client.connect())

    def synthesize(self, text: str, **options: Any) -> Synthesis:
        """Speak text and return its whole audio; see :meth:`ChatterboxClient.synthesize`."""
        return self._run(self._client.synthesize(text, **options))

    def stream(self, text: str, **options: Any) -> Iterator[AudioChunk]:
        """Speak text and yield its audio as it comes; see :meth:`ChatterboxClient.stream`."""
        chunks = self._client.stream(text, **options)

        async def step() -> AudioChunk | None:
            try:
                return await anext(chunks)
            except StopAsyncIteration:
                return None

        try:
            while (chunk := self._run(step())) is not None:
                yield chunk
        finally:
            self._run(chunks.aclose())

    def register_voice(self, voice_id: str, reference: str | Path | bytes) -> dict[str, Any]:
        """Register a voice; see :meth:`ChatterboxClient.register_voice`."""
        return self._run(self._client.register_voice(voice_id, reference))

    def delete_voice(self, voice_id: str) -> None:
        """Delete a voice; see :meth:`ChatterboxClient.delete_voice`."""
        self._run(self._client.delete_voice(voice_id))

    def list_voices(self) -> list[dict[str, Any]]:
        """List the voices; see :meth:`ChatterboxClient.list_voices`."""
        return self._run(self._client.list_voices())

    def health(self) -> dict[str, Any]:
        """Read ``/health``; see :meth:`ChatterboxClient.health`."""
        return self._run(self._client.health())

    def close(self) -> None:
        """Close the connection and stop the loop thread."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
