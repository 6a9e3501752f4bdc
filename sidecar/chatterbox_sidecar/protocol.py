"""Protocol v1: parsing client messages and building server messages.

Pure functions and dataclasses, no I/O. ``docs/protocol.md`` is the prose version of this module.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatterbox_sidecar.voices import VOICE_ID_PATTERN

PROTOCOL_VERSION = 1
PATH = "/v1/stream/tts"
DEFAULT_SAMPLE_RATE = 24000
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000
ENCODINGS = ("pcm_f32le", "pcm_s16le", "pcm_mulaw")
DEFAULT_ENCODING = "pcm_f32le"
CONTEXT_ID_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces; fullmatch
# Text a client may never send: NUL and lone surrogates (not Unicode text at all).
_FORBIDDEN_TEXT = re.compile(r"[\x00\ud800-\udfff]")
# Other control characters (C0 but tab and newlines, DEL, C1) and noncharacters become spaces.
_CONTROL_TEXT = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffe\uffff]")

_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")
# An ISO 639-1 code, optionally with BCP 47 subtags ("pt-BR", "zh_Hant"): the code is kept.
_LANGUAGE = re.compile(r"([A-Za-z]{2})(?:[-_][A-Za-z0-9]{1,8})*")

ERROR_CODES = (
    "invalid_json",
    "unknown_type",
    "invalid_request",
    "text_too_long",
    "voice_not_found",
    "invalid_audio",
    "unsupported",
    "busy",
    "timeout",
    "quota_exceeded",
    "engine_error",
    "not_ready",
    "not_found",
    "unauthorized",
    "internal_error",
)


class ProtocolError(Exception):
    """A client message the server rejects; sent back as an ``error`` message."""

    def __init__(self, code: str, message: str, context_id: str | None = None):
        """Initialize the error.

        Args:
            code: One of ``ERROR_CODES``.
            message: Human-readable explanation.
            context_id: The context the error ends, if any.
        """
        super().__init__(message)
        self.code = code
        self.message = message
        self.context_id = context_id


class HttpError(ProtocolError):
    """A request an HTTP route refuses with a given status, naming the field at fault."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        """Initialize the error.

        Args:
            status: HTTP status.
            code: One of ``ERROR_CODES`` (or OpenAI's ``model_not_found`` on its routes).
            message: Human-readable explanation.
            param: The request field at fault, if any.
        """
        super().__init__(code, message)
        self.status = status
        self.param = param


@dataclass(frozen=True)
class Synthesize:
    """A ``synthesize`` message: text for a context, opening it or appending to it.

    ``language`` is the ISO 639-1 code asked for (lower case), or None for the model's default.
    """

    text: str
    context_id: str | None
    continue_: bool
    voice_id: str
    streaming: bool | None
    exaggeration: float
    cfg_weight: float
    temperature: float
    seed: int | None
    sample_rate: int
    encoding: str
    word_timestamps: bool = False
    language: str | None = None


@dataclass(frozen=True)
class Flush:
    """A ``flush`` message: no more text for the context."""

    context_id: str


@dataclass(frozen=True)
class Cancel:
    """A ``cancel`` message: stop the context at once."""

    context_id: str


@dataclass(frozen=True)
class RegisterVoice:
    """A ``register_voice`` message, with the reference audio already base64-decoded."""

    voice_id: str
    reference_audio: bytes


@dataclass(frozen=True)
class DeleteVoice:
    """A ``delete_voice`` message."""

    voice_id: str


@dataclass(frozen=True)
class ListVoices:
    """A ``list_voices`` message."""


@dataclass(frozen=True)
class KeepAlive:
    """A ``keepalive`` message: no reply; it keeps an idle connection open."""


ClientMessage = Synthesize | Flush | Cancel | RegisterVoice | DeleteVoice | ListVoices | KeepAlive

_MISSING = object()


class _Fields:
    """Typed access to the fields of one JSON object, raising ``invalid_request``."""

    def __init__(self, obj: dict[str, Any], context_id: str | None = None):
        self._obj = obj
        self.context_id = context_id

    def _fail(self, message: str) -> ProtocolError:
        return ProtocolError("invalid_request", message, self.context_id)

    def str(self, name: str, default: Any = _MISSING) -> Any:
        value = self._obj.get(name, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                raise self._fail(f"'{name}' is required")
            return default
        if not isinstance(value, str):
            raise self._fail(f"'{name}' must be a string")
        return value

    def bool(self, name: str, default: Any) -> Any:
        value = self._obj.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(f"'{name}' must be true or false")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self._obj.get(name)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self._fail(f"'{name}' must be a number")
        if not low <= value <= high:
            raise self._fail(f"'{name}' must be between {low:g} and {high:g}")
        return float(value)

    def int(self, name: str, default: Any, low: int, high: int) -> Any:
        value = self._obj.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(f"'{name}' must be an integer")
        if not low <= value <= high:
            raise self._fail(f"'{name}' must be between {low} and {high}")
        return value


Fields = _Fields  # typed field access, for the HTTP routes' JSON bodies


def _context_id(fields: _Fields, required: bool) -> str | None:
    value = fields.str("context_id", _MISSING if required else None)
    if value is not None and not CONTEXT_ID_PATTERN.fullmatch(value):
        raise ProtocolError(
            "invalid_request", "'context_id' must be 1-128 printable ASCII characters, no spaces"
        )
    return value


def _voice_id(fields: _Fields, default: Any = _MISSING) -> str:
    value = fields.str("voice_id", default)
    if not VOICE_ID_PATTERN.fullmatch(value):
        raise ProtocolError(
            "invalid_request",
            "'voice_id' must be 1-64 characters of letters, digits, '_' or '-'",
            fields.context_id,
        )
    return value


def parse_language(value: str | None, context_id: str | None = None) -> str | None:
    """Check a requested language.

    Args:
        value: An ISO 639-1 code (``es``); a BCP 47 tag (``pt-BR``) is read as its code. None
            for the model's default.
        context_id: The context asking, for the error.

    Returns:
        The lower-case two-letter code, or None.

    Raises:
        ProtocolError: ``invalid_request`` for anything that is not a language code. (Whether
            the model speaks it is the server's question: ``unsupported``.)
    """
    if value is None:
        return None
    match = _LANGUAGE.fullmatch(value)
    if match is None:
        raise ProtocolError(
            "invalid_request",
            "'language' must be an ISO 639-1 code such as 'en' or 'es'",
            context_id,
        )
    return match[1].lower()


def parse_client_message(raw: str) -> ClientMessage:
    """Parse and validate one client text frame.

    Args:
        raw: The frame's text.

    Returns:
        The message.

    Raises:
        ProtocolError: ``invalid_json``, ``unknown_type`` or ``invalid_request`` (with the
            message's ``context_id`` when it had a valid one).
    """
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ProtocolError("invalid_json", f"message is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("invalid_request", "message must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("invalid_request", "'type' is required and must be a string")
    fields = _Fields(obj)
    if kind in ("synthesize", "flush", "cancel"):
        raw_cid = obj.get("context_id")
        if isinstance(raw_cid, str) and CONTEXT_ID_PATTERN.fullmatch(raw_cid):
            fields.context_id = raw_cid
    if kind == "synthesize":
        return _parse_synthesize(fields)
    if kind == "flush":
        return Flush(_context_id(fields, required=True))
    if kind == "cancel":
        return Cancel(_context_id(fields, required=True))
    if kind == "register_voice":
        return RegisterVoice(_voice_id(fields), _decode_audio(fields.str("reference_audio")))
    if kind == "delete_voice":
        return DeleteVoice(_voice_id(fields))
    if kind == "list_voices":
        return ListVoices()
    if kind == "keepalive":
        return KeepAlive()
    raise ProtocolError("unknown_type", f"unknown message type '{kind[:64]}'")


def parse_synthesis_fields(obj: dict[str, Any]) -> Synthesize:
    """Parse a JSON object holding a ``synthesize`` message's fields (the HTTP routes' bodies).

    Args:
        obj: The decoded object; ``type`` is not needed.

    Returns:
        The request, validated as a websocket ``synthesize`` message is.

    Raises:
        ProtocolError: ``invalid_request`` for a missing, wrongly typed or out-of-range field.
    """
    return _parse_synthesize(Fields(obj))


def parse_register_voice(obj: dict[str, Any]) -> RegisterVoice:
    """Parse a JSON object holding a ``register_voice`` message's fields (``POST /v1/voices``).

    Args:
        obj: The decoded object; ``type`` is not needed.

    Returns:
        The request, its reference audio base64-decoded.

    Raises:
        ProtocolError: ``invalid_request`` (bad ``voice_id``) or ``invalid_audio`` (not base64).
    """
    fields = Fields(obj)
    return RegisterVoice(_voice_id(fields), _decode_audio(fields.str("reference_audio")))


def check_voice_id(voice_id: str) -> str:
    """Check a voice id from outside a JSON body (an HTTP path or form field).

    Args:
        voice_id: The id.

    Returns:
        The id, unchanged.

    Raises:
        ProtocolError: ``invalid_request`` if it does not match ``VOICE_ID_PATTERN``.
    """
    return _voice_id(Fields({"voice_id": voice_id}))


def clean_text(text: str, context_id: str | None = None) -> str:
    """Check text a client sent for synthesis.

    Args:
        text: The text.
        context_id: The context it belongs to, for the error.

    Returns:
        The text with control characters (other than tab and newlines) replaced by spaces.

    Raises:
        ProtocolError: ``invalid_request`` for NUL or a lone surrogate, which no text holds.
    """
    bad = _FORBIDDEN_TEXT.search(text)
    if bad is not None:
        raise ProtocolError(
            "invalid_request",
            f"'text' holds an invalid character (U+{ord(bad.group()):04X}) at {bad.start()}",
            context_id,
        )
    return _CONTROL_TEXT.sub(" ", text)


def _parse_synthesize(fields: _Fields) -> Synthesize:
    context_id = _context_id(fields, required=False)
    text = clean_text(fields.str("text"), fields.context_id)
    continue_ = fields.bool("continue", False)
    if not continue_ and not text.strip():
        raise ProtocolError("invalid_request", "'text' must not be empty", fields.context_id)
    encoding = fields.str("encoding", DEFAULT_ENCODING)
    if encoding not in ENCODINGS:
        raise ProtocolError(
            "invalid_request",
            f"'encoding' must be one of {', '.join(ENCODINGS)}",
            fields.context_id,
        )
    return Synthesize(
        text=text,
        context_id=context_id,
        continue_=continue_,
        voice_id=_voice_id(fields, "default"),
        streaming=fields.bool("streaming", None),
        exaggeration=fields.number("exaggeration", 0.5, 0.0, 2.0),
        cfg_weight=fields.number("cfg_weight", 0.5, 0.0, 2.0),
        temperature=fields.number("temperature", 0.8, 0.05, 5.0),
        seed=fields.int("seed", None, 0, 2**32 - 1),
        sample_rate=fields.int(
            "sample_rate", DEFAULT_SAMPLE_RATE, MIN_SAMPLE_RATE, MAX_SAMPLE_RATE
        ),
        encoding=encoding,
        word_timestamps=fields.bool("word_timestamps", False),
        language=parse_language(fields.str("language", None), fields.context_id),
    )


def _decode_audio(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_audio", "'reference_audio' is not valid base64") from None


def encode(message: dict[str, Any]) -> str:
    """Serialise a server message.

    Args:
        message: The message, with its ``type``.

    Returns:
        Compact JSON text.
    """
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def error(code: str, message: str, context_id: str | None = None) -> dict[str, Any]:
    """Build an ``error`` message.

    Args:
        code: One of ``ERROR_CODES``.
        message: Human-readable explanation.
        context_id: The context this error ends, if any.

    Returns:
        The message.
    """
    msg: dict[str, Any] = {"type": "error", "code": code, "message": _no_reprs(message)}
    if context_id is not None:
        msg["context_id"] = context_id
    return msg


def _no_reprs(message: str) -> str:
    # A last guard for messages built from exceptions: object reprs carry memory addresses.
    return _REPR.sub("<object>", message)


def started(
    context_id: str,
    request: Synthesize,
    streaming: bool,
    not_applied: Sequence[str] = (),
    word_timestamps: bool = False,
    language: str | None = None,
) -> dict[str, Any]:
    """Build a ``started`` message echoing the parameters in effect.

    Args:
        context_id: The context.
        request: The message that opened the context.
        streaming: The mode in effect (the request's flag or the server default).
        not_applied: Parameters the engine's model ignores (Turbo: ``exaggeration``,
            ``cfg_weight``); they are echoed as sent and listed here, never silently dropped.
        word_timestamps: Whether ``timestamps`` messages come for this context (asked for,
            and the engine can align).
        language: The language in effect (the request's, or the model's default).

    Returns:
        The message.
    """
    return {
        "type": "started",
        "context_id": context_id,
        "sample_rate": request.sample_rate,
        "encoding": request.encoding,
        "voice_id": request.voice_id,
        "streaming": streaming,
        "exaggeration": request.exaggeration,
        "cfg_weight": request.cfg_weight,
        "temperature": request.temperature,
        "seed": request.seed,
        "language": language if language is not None else request.language,
        "not_applied": list(not_applied),
        "word_timestamps": word_timestamps,
    }


def timestamps(
    context_id: str, words: list[str], start: list[float], end: list[float]
) -> dict[str, Any]:
    """Build a ``timestamps`` message: client words and when they are spoken.

    Args:
        context_id: The context.
        words: The words, as the client sent them (split on whitespace), in order.
        start: Each word's start, in seconds from the context's first audio sample.
        end: Each word's end, on the same clock.

    Returns:
        The message.
    """
    return {
        "type": "timestamps",
        "context_id": context_id,
        "words": words,
        "start": start,
        "end": end,
    }


def done(context_id: str, audio_seconds: float, ttfb_ms: float | None) -> dict[str, Any]:
    """Build a ``done`` message.

    Args:
        context_id: The context.
        audio_seconds: Duration of all audio sent for it.
        ttfb_ms: From receipt of its first text to its first audio byte, or None without audio.

    Returns:
        The message.
    """
    return {
        "type": "done",
        "context_id": context_id,
        "audio_seconds": round(audio_seconds, 6),
        "ttfb_ms": None if ttfb_ms is None else round(ttfb_ms, 1),
    }


def cancelled(context_id: str) -> dict[str, Any]:
    """Build a ``cancelled`` message.

    Args:
        context_id: The context.

    Returns:
        The message.
    """
    return {"type": "cancelled", "context_id": context_id}
