"""The HTTP API beside the websocket: synthesis (ours and OpenAI's), models, voice management.

Routes (registered by the server on its one port, behind its auth middleware):

- ``POST /v1/synthesize``: a JSON body with the websocket ``synthesize`` fields plus ``format``;
  the audio whole, or with ``"streaming": true`` chunked as it is generated.
- ``POST /v1/audio/speech``: OpenAI's speech API; ``GET /v1/models``, ``GET /v1/audio/voices``.
- ``POST /v1/voices`` (JSON with base64 audio, or multipart), ``DELETE /v1/voices/{voice_id}``.

A synthesis runs through :meth:`App.synthesize_stream`: it counts against the capacity while it
runs, is refused (with an error status) before the first byte when it cannot be served, and
stops generating when the client goes away (aiohttp cancels the handler).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from http import HTTPStatus
from typing import Any

import numpy as np
from aiohttp import BodyPartReader, web
from loguru import logger

from chatterbox_sidecar import openai_api, protocol
from chatterbox_sidecar.app import App
from chatterbox_sidecar.audio import StreamEncoder, resample
from chatterbox_sidecar.engines.base import EngineError
from chatterbox_sidecar.formats import FORMATS, AudioFormat, StreamWriter, encode_file
from chatterbox_sidecar.protocol import Fields, HttpError, ProtocolError

STATUS_OF_CODE = {
    "busy": HTTPStatus.SERVICE_UNAVAILABLE,
    "not_ready": HTTPStatus.SERVICE_UNAVAILABLE,
    "voice_not_found": HTTPStatus.NOT_FOUND,
    "not_found": HTTPStatus.NOT_FOUND,
    "model_not_found": HTTPStatus.NOT_FOUND,
    "unauthorized": HTTPStatus.UNAUTHORIZED,
    "quota_exceeded": HTTPStatus.INSUFFICIENT_STORAGE,
    "engine_error": HTTPStatus.INTERNAL_SERVER_ERROR,
    "internal_error": HTTPStatus.INTERNAL_SERVER_ERROR,
}
JSON_TYPES = ("application/json",)
VOICE_TYPES = ("application/json", "multipart/form-data")
MULTIPART_CHUNK = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_openai_path(path: str) -> bool:
    """Returns: whether ``path`` is one of the OpenAI-compatible routes (OpenAI's error shape)."""
    return path.startswith(openai_api.PREFIXES)


def error_response(
    path: str,
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """Build an HTTP error in the shape the route's clients expect.

    Args:
        path: The request's path: OpenAI's routes get ``{"error": {...}}``, the others the
            protocol's ``{"type": "error", "code", "message"}``.
        status: HTTP status.
        code: Error code.
        message: Explanation.
        param: The request field at fault (OpenAI's shape only).
        headers: Extra headers.

    Returns:
        The response.
    """
    if is_openai_path(path):
        body: dict[str, Any] = openai_api.error_body(int(status), code, message, param)
    else:
        body = protocol.error(code, message)
    return web.json_response(body, status=int(status), headers=headers)


def status_of(error: ProtocolError) -> int:
    """Returns: the HTTP status of a refused request: its own, or the one its code implies."""
    if isinstance(error, HttpError):
        return error.status
    return int(STATUS_OF_CODE.get(error.code, HTTPStatus.BAD_REQUEST))


class HttpApi:
    """The HTTP routes of one :class:`App`."""

    def __init__(self, app: App):
        """Initialize the routes.

        Args:
            app: The sidecar app.
        """
        self._app = app

    def register(self, router: web.UrlDispatcher) -> None:
        """Add the routes to an aiohttp router.

        Args:
            router: The application's router.
        """
        router.add_post("/v1/synthesize", self._guard(self.synthesize))
        router.add_post("/v1/audio/speech", self._guard(self.speech))
        router.add_get("/v1/models", self._guard(self.models))
        router.add_get("/v1/audio/voices", self._guard(self.audio_voices))
        router.add_post("/v1/voices", self._guard(self.register_voice))
        router.add_delete("/v1/voices/{voice_id}", self._guard(self.delete_voice))

    def _guard(self, handler: Handler) -> Handler:
        """Answer every refusal of ``handler`` with its status, in the route's error shape."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except ProtocolError as e:
                return self._error(request, status_of(e), e.code, e.message, e)
            except EngineError as e:
                status = int(STATUS_OF_CODE.get(e.code, HTTPStatus.BAD_REQUEST))
                return self._error(request, status, e.code, str(e))

        return guarded

    def _error(
        self,
        request: web.Request,
        status: int,
        code: str,
        message: str,
        error: ProtocolError | None = None,
    ) -> web.Response:
        self._app.metrics.errors.labels(code).inc()
        param = error.param if isinstance(error, HttpError) else None
        return error_response(request.path, status, code, message, param)

    # --- model and voice discovery ----------------------------------------------------------

    @property
    def model_names(self) -> tuple[str, ...]:
        """Returns: the served model's name (the engine's) and OpenAI's names as aliases."""
        served = self._app.engine.info.name
        return (served, *(m for m in openai_api.MODEL_ALIASES if m != served))

    async def models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``: the model names ``/v1/audio/speech`` accepts."""
        return web.json_response(openai_api.models(self.model_names, int(self._app.started_at)))

    async def audio_voices(self, request: web.Request) -> web.Response:
        """``GET /v1/audio/voices``: the voices, as OpenAI-style voice objects."""
        return web.json_response(openai_api.voices(self._app.list_voices()))

    # --- synthesis ---------------------------------------------------------------------------

    async def synthesize(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/synthesize``: the websocket's ``synthesize`` fields plus ``format``."""
        obj = await self._json_body(request)
        if not isinstance(obj, dict):
            raise HttpError(400, "invalid_request", "the body must be a JSON object")
        if obj.get("continue") is not None or obj.get("context_id") is not None:
            raise HttpError(
                400,
                "invalid_request",
                "'continue' and 'context_id' are websocket fields: an HTTP request is one "
                "whole text",
            )
        if obj.get("word_timestamps") is True:
            raise HttpError(
                400,
                "invalid_request",
                "'word_timestamps' come as websocket messages beside the audio; an HTTP "
                "response carries audio only",
            )
        if obj.get("encoding") is None:
            obj = {**obj, "encoding": "pcm_s16le"}  # the HTTP default: the most readable WAV
        name = Fields(obj).str("format", "wav")
        fmt = FORMATS.get(name)
        if fmt is None:
            raise HttpError(
                400, "invalid_request", f"'format' must be one of {', '.join(FORMATS)}", "format"
            )
        request_fields = protocol.parse_synthesis_fields(obj)
        streaming = bool(request_fields.streaming)  # default: one whole file
        return await self._audio(request, request_fields, fmt, streaming, sse=False)

    async def speech(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/audio/speech``: OpenAI's speech API."""
        obj = await self._json_body(request)
        voices = self._app.voices
        speech = openai_api.parse_speech(
            obj, self.model_names, lambda voice_id: voices.get(voice_id) is not None
        )
        return await self._audio(
            request,
            speech.synthesize,
            speech.fmt,
            speech.stream or speech.stream_format == "sse",
            sse=speech.stream_format == "sse",
        )

    async def _audio(
        self,
        request: web.Request,
        msg: protocol.Synthesize,
        fmt: AudioFormat,
        stream: bool,
        sse: bool,
    ) -> web.StreamResponse:
        app = self._app
        if not app.ready.is_set():
            raise ProtocolError("not_ready", "engine is loading")
        if len(msg.text) > app.config.max_text_chars:
            raise HttpError(
                400,
                "text_too_long",
                f"text exceeds {app.config.max_text_chars} characters",
                "input" if is_openai_path(request.path) else "text",
            )
        if (rate_error := fmt.rate_error(msg.sample_rate)) is not None:
            raise HttpError(400, "invalid_request", rate_error, "sample_rate")
        context_id = f"http-{uuid.uuid4().hex[:8]}"
        params = app.synthesis_params(msg, context_id, stream)
        headers = {"X-Sample-Rate": str(msg.sample_rate), "X-Audio-Format": fmt.name}
        if fmt.name in ("wav", "pcm"):
            headers["X-Encoding"] = msg.encoding
        chunks = app.synthesize_stream(msg.text, params, context_id)
        async with aclosing(chunks):
            # Everything a request is refused for comes before the first chunk: until then an
            # error is still an error status.
            first = await anext(chunks, None)
            if not stream:
                return await self._whole(chunks, first, fmt, msg, headers)
            logger.debug(
                f"{context_id}: streaming {fmt.name} at {msg.sample_rate} Hz "
                f"({'sse' if sse else 'chunked'})"
            )
            content_type = "text/event-stream" if sse else fmt.content_type
            response = web.StreamResponse(headers={**headers, "Content-Type": content_type})
            response.enable_chunked_encoding()
            await response.prepare(request)
            await self._stream(request, response, chunks, first, fmt, msg, sse, context_id)
            return response

    async def _whole(
        self,
        chunks: AsyncIterator[np.ndarray],
        first: np.ndarray | None,
        fmt: AudioFormat,
        msg: protocol.Synthesize,
        headers: dict[str, str],
    ) -> web.Response:
        pieces = [] if first is None else [first]
        pieces += [chunk async for chunk in chunks]
        audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        native = self._app.engine.info.native_sample_rate

        def encode() -> bytes:
            return encode_file(
                resample(audio, native, msg.sample_rate), msg.sample_rate, fmt, msg.encoding
            )

        body = await asyncio.to_thread(encode)
        return web.Response(body=body, headers={**headers, "Content-Type": fmt.content_type})

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        chunks: AsyncIterator[np.ndarray],
        first: np.ndarray | None,
        fmt: AudioFormat,
        msg: protocol.Synthesize,
        sse: bool,
        context_id: str,
    ) -> None:
        app = self._app
        resampler = StreamEncoder(app.engine.info.native_sample_rate, msg.sample_rate, "pcm_f32le")
        writer = StreamWriter(msg.sample_rate, fmt, msg.encoding)

        async def encode(step: Callable[[], bytes]) -> bytes:
            # libsndfile's codecs cost real CPU: off the event loop, so that websocket audio
            # keeps flowing; WAV and PCM are a copy
            return await asyncio.to_thread(step) if fmt.compressed else step()

        async def send(data: bytes) -> None:
            if data:
                payload = openai_api.sse_delta(data) if sse else data
                await asyncio.wait_for(response.write(payload), app.config.stall_seconds)

        try:
            chunk = first
            while chunk is not None:
                audio = np.frombuffer(resampler.encode(chunk), dtype="<f4")
                await send(await encode(lambda audio=audio: writer.write(audio)))
                chunk = await anext(chunks, None)
            tail = np.frombuffer(resampler.flush(), dtype="<f4")
            await send(await encode(lambda: writer.write(tail) + writer.close()))
            if sse:
                await send_raw(response, openai_api.sse_done(resampler.seconds_out), app)
            await response.write_eof()
        except asyncio.CancelledError:
            logger.info(f"{context_id}: the client went away; synthesis stopped")
            raise
        except TimeoutError:
            app.metrics.stalls.inc()
            app.metrics.errors.labels("stalled").inc()
            logger.warning(
                f"{context_id}: client stopped reading audio for {app.config.stall_seconds:g} s; "
                "closing the connection"
            )
            _abort(request)
        except (ProtocolError, EngineError) as e:
            # Headers and audio are gone already: an SSE stream ends with an error event; a
            # raw stream is cut off, so that the client sees an incomplete body, not a short
            # file it would take as whole.
            app.metrics.errors.labels(e.code).inc()
            message = e.message if isinstance(e, ProtocolError) else str(e)
            logger.warning(f"{context_id}: failed after its first audio: {e.code}: {message}")
            if sse:
                await send_raw(response, openai_api.sse_error(e.code, message), app)
                await response.write_eof()
            else:
                _abort(request)

    # --- voices ------------------------------------------------------------------------------

    async def register_voice(self, request: web.Request) -> web.Response:
        """``POST /v1/voices``: JSON ``{"voice_id", "reference_audio"}`` or multipart."""
        app = self._app
        if request.content_type == "multipart/form-data":
            self._check_length(request)
            voice_id, data = await self._voice_form(request)
        else:
            obj = await self._json_body(request, VOICE_TYPES)
            if not isinstance(obj, dict):
                raise HttpError(400, "invalid_request", "the body must be a JSON object")
            message = protocol.parse_register_voice(obj)
            voice_id, data = message.voice_id, message.reference_audio
        if not app.ready.is_set():
            raise ProtocolError("not_ready", "engine is loading")
        existed = app.voices.get(voice_id) is not None
        voice = await app.register_voice(voice_id, data)
        body = {"type": "voice_registered", "voice_id": voice.voice_id, "voice": voice.describe()}
        return web.json_response(body, status=200 if existed else 201)

    async def delete_voice(self, request: web.Request) -> web.Response:
        """``DELETE /v1/voices/{voice_id}``."""
        voice_id = protocol.check_voice_id(request.match_info["voice_id"])
        await self._app.delete_voice(voice_id)
        return web.json_response({"type": "voice_deleted", "voice_id": voice_id})

    async def _voice_form(self, request: web.Request) -> tuple[str, bytes]:
        limit = self._app.config.max_frame_bytes
        fields: dict[str, bytes] = {}
        read = 0
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise HttpError(400, "invalid_request", "nested multipart is not accepted")
                data = bytearray()
                while chunk := await part.read_chunk(MULTIPART_CHUNK):
                    read += len(chunk)
                    if read > limit:
                        raise HttpError(
                            413, "invalid_request", f"body exceeds {limit} bytes", part.name
                        )
                    data += chunk
                if part.name in ("voice_id", "file"):
                    fields[part.name] = bytes(data)
        except (ValueError, AssertionError, UnicodeDecodeError) as e:
            raise HttpError(400, "invalid_request", f"malformed multipart body: {e}") from None
        if "file" not in fields:
            raise HttpError(400, "invalid_request", "the form needs a 'file' part", "file")
        if "voice_id" not in fields:
            raise HttpError(400, "invalid_request", "the form needs a 'voice_id' field", "voice_id")
        try:
            voice_id = fields["voice_id"].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise HttpError(400, "invalid_request", "'voice_id' is not UTF-8", "voice_id") from None
        return protocol.check_voice_id(voice_id), fields["file"]

    # --- bodies ------------------------------------------------------------------------------

    def _check_length(self, request: web.Request) -> None:
        limit = self._app.config.max_frame_bytes
        if request.content_length is not None and request.content_length > limit:
            raise HttpError(413, "invalid_request", f"body exceeds {limit} bytes")

    async def _json_body(self, request: web.Request, types: tuple[str, ...] = JSON_TYPES) -> Any:
        """Read and decode a JSON body.

        Refusals: 413 past the frame limit (from ``Content-Length`` before reading, else as soon
        as the limit is passed), 415 for another content type, 400 for bad JSON.
        """
        self._check_length(request)
        if request.content_type != "application/json":
            raise HttpError(
                415,
                "invalid_request",
                f"Content-Type must be {' or '.join(types)} (got {request.content_type})",
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = self._app.config.max_frame_bytes
            raise HttpError(413, "invalid_request", f"body exceeds {limit} bytes") from None
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:
            raise HttpError(400, "invalid_json", f"body is not valid JSON: {e}") from None


async def send_raw(response: web.StreamResponse, data: bytes, app: App) -> None:
    """Write bytes to a streamed response, giving up after ``TTS_STALL_SECONDS``."""
    await asyncio.wait_for(response.write(data), app.config.stall_seconds)


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()
