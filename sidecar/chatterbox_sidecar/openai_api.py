"""OpenAI's speech API shapes: ``POST /v1/audio/speech`` requests, models, voices and errors.

Pure functions, no I/O, checked against the official ``openai`` package's
``resources/audio/speech.py`` and ``types/audio/speech_create_params.py``: ``model``, ``input``,
``voice`` (a string or ``{"id": ...}``), ``response_format`` (default ``mp3``), ``speed``
(0.25-4.0), ``stream_format`` (``audio`` or ``sse``), ``instructions``; errors as
``{"error": {"message", "type", "param", "code"}}``. Extensions: the websocket's generation
fields (``exaggeration``, ``cfg_weight``, ``temperature``, ``seed``), ``sample_rate`` and
``language`` (ISO 639-1; OpenAI's model detects the language, ours is told it).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chatterbox_sidecar import protocol
from chatterbox_sidecar.formats import FORMATS, UNSUPPORTED_FORMATS, AudioFormat
from chatterbox_sidecar.protocol import Fields, HttpError, ProtocolError

PREFIXES = ("/v1/audio/", "/v1/models")  # routes that answer errors in OpenAI's shape
# OpenAI's model names, accepted for the served model so that OpenAI clients work unchanged
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15")
# OpenAI's built-in voices: unless a voice of that name is registered, they speak with the
# engine's default voice, so that code written for OpenAI runs with its voice names
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer"}
    | {"verse", "marin", "cedar"}
)
SAMPLE_RATE = 24000  # OpenAI's rate for every format; ``sample_rate`` (an extension) overrides
MIN_SPEED, MAX_SPEED = 0.25, 4.0
STREAM_FORMATS = ("audio", "sse")


@dataclass(frozen=True)
class SpeechRequest:
    """A validated ``POST /v1/audio/speech`` body.

    Parameters:
        synthesize: The text and generation fields, as the websocket's ``synthesize`` holds them.
        voice_id: The voice to speak with (an OpenAI built-in name mapped to ``default``).
        fmt: The file format.
        stream_format: ``audio`` (the file's bytes) or ``sse`` (base64 in server-sent events).
        stream: Send the audio as it is generated (True) or as one file with exact headers.
    """

    synthesize: protocol.Synthesize
    voice_id: str
    fmt: AudioFormat
    stream_format: str
    stream: bool


def parse_speech(
    obj: Any, model_names: tuple[str, ...], is_registered: Callable[[str], bool]
) -> SpeechRequest:
    """Validate an OpenAI speech request.

    Args:
        obj: The decoded JSON body.
        model_names: Model names this server answers to.
        is_registered: Tells whether a voice id is registered here (an OpenAI voice name that
            is one is that voice, not the default).

    Returns:
        The request.

    Raises:
        HttpError: For any field OpenAI's API or this server refuses.
    """
    if not isinstance(obj, dict):
        raise HttpError(400, "invalid_request", "the body must be a JSON object")
    fields = Fields(obj)
    model = _field(fields.str, "model")
    if model not in model_names:
        raise HttpError(
            404,
            "model_not_found",
            f"the model '{model[:64]}' does not exist here; use one of: {', '.join(model_names)}",
            "model",
        )
    text = _field(fields.str, "input")
    if not text.strip():
        raise HttpError(400, "invalid_request", "'input' must not be empty", "input")
    voice_id = _voice(obj.get("voice"), is_registered)
    name = _field(fields.str, "response_format", "mp3")
    fmt = FORMATS.get(name)
    if fmt is None:
        why = UNSUPPORTED_FORMATS.get(name, "unknown format")
        raise HttpError(
            400,
            "unsupported",
            f"response_format '{name[:32]}' is not supported ({why}); use one of: "
            f"{', '.join(FORMATS)}",
            "response_format",
        )
    speed = _field(fields.number, "speed", 1.0, MIN_SPEED, MAX_SPEED)
    if speed != 1.0:
        raise HttpError(
            400,
            "unsupported",
            f"speed {speed:g} is not supported: this server speaks at speed 1.0 only",
            "speed",
        )
    stream_format = _field(fields.str, "stream_format", "audio")
    if stream_format not in STREAM_FORMATS:
        raise HttpError(
            400, "invalid_request", "'stream_format' must be 'audio' or 'sse'", "stream_format"
        )
    _field(fields.str, "instructions", "")  # accepted for compatibility; no engine follows it
    stream = _field(fields.bool, "stream", True)
    body = {
        "text": text,
        "voice_id": voice_id,
        "sample_rate": obj.get("sample_rate", SAMPLE_RATE),
        "encoding": "pcm_s16le",
        "streaming": stream,
    }
    for name in ("exaggeration", "cfg_weight", "temperature", "seed", "language"):
        if name in obj:
            body[name] = obj[name]
    try:
        synthesize = protocol.parse_synthesis_fields(body)
    except ProtocolError as e:
        raise HttpError(400, e.code, e.message, _param_of(e.message)) from None
    if (rate_error := fmt.rate_error(synthesize.sample_rate)) is not None:
        raise HttpError(400, "invalid_request", rate_error, "sample_rate")
    return SpeechRequest(synthesize, voice_id, fmt, stream_format, stream)


def _field(getter, name: str, *args):
    try:
        return getter(name, *args)
    except ProtocolError as e:
        raise HttpError(400, e.code, e.message, name) from None


def _param_of(message: str) -> str | None:
    if message.startswith("'") and "'" in message[1:]:
        return message[1 : message.index("'", 1)]
    return None


def _voice(value: Any, is_registered: Callable[[str], bool]) -> str:
    if isinstance(value, dict):  # OpenAI's custom voice object
        value = value.get("id")
    if not isinstance(value, str):
        raise HttpError(
            400, "invalid_request", "'voice' must be a voice id or {\"id\": voice id}", "voice"
        )
    if value.lower() in OPENAI_VOICES and not is_registered(value):
        return "default"
    try:
        return protocol.check_voice_id(value)
    except ProtocolError as e:
        raise HttpError(400, e.code, e.message, "voice") from None


def error_body(
    status: int, code: str, message: str, param: str | None = None
) -> dict[str, dict[str, str | None]]:
    """Build an error in OpenAI's shape.

    Args:
        status: The HTTP status (it picks ``type``).
        code: The error code.
        message: Explanation.
        param: The request field at fault, if any.

    Returns:
        ``{"error": {"message", "type", "param", "code"}}``.
    """
    if status == 401:
        kind, code = "invalid_request_error", "invalid_api_key"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def models(model_names: tuple[str, ...], created: int) -> dict[str, Any]:
    """Build ``GET /v1/models``: every name ``/v1/audio/speech`` accepts, served model first.

    Args:
        model_names: The names.
        created: When the server started (Unix seconds).

    Returns:
        An OpenAI list of model objects.
    """
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "pipecat-chatterbox"}
            for name in model_names
        ],
    }


def voices(listed: list[dict[str, Any]]) -> dict[str, Any]:
    """Build ``GET /v1/audio/voices`` from the sidecar's voice list.

    Args:
        listed: :meth:`App.list_voices`'s entries.

    Returns:
        An OpenAI-style list of voice objects, and ``voices``: their ids.
    """
    data = [
        {
            "id": v["voice_id"],
            "object": "audio.voice",
            "name": v["voice_id"],
            "type": "builtin" if v.get("kind") == "builtin" else "audio_sample",
            "created_at": v.get("created_at"),
            "usable": v.get("usable", True),
        }
        for v in listed
    ]
    return {"object": "list", "data": data, "voices": [v["id"] for v in data]}


def sse_delta(audio: bytes) -> bytes:
    """Returns: one ``speech.audio.delta`` server-sent event carrying ``audio`` in base64."""
    event = {"type": "speech.audio.delta", "audio": base64.b64encode(audio).decode("ascii")}
    return _sse(event)


def sse_done(audio_seconds: float) -> bytes:
    """Returns: the ``speech.audio.done`` event (usage in tokens is zero: nothing is metered)."""
    event = {
        "type": "speech.audio.done",
        "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
        "audio_seconds": round(audio_seconds, 6),
    }
    return _sse(event)


def sse_error(code: str, message: str) -> bytes:
    """Returns: an ``error`` event ending a stream that failed after its first audio."""
    return _sse({"type": "error", **error_body(500, code, message)})


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
