"""Voice management over the sidecar websocket: register, delete and list voices.

These functions open a short-lived connection of their own, for scripts and for setting a
bot up before its pipeline runs. They need only ``websockets`` (no Pipecat)::

    from pipecat_chatterbox.voices import register_voice

    await register_voice("ws://localhost:8002/v1/stream/tts", "alice", "alice.wav")

They are thin wrappers of :class:`~pipecat_chatterbox.client.ChatterboxClient`, which does the
same on a connection that stays open. A running
:class:`~pipecat_chatterbox.tts.ChatterboxTTSService` does it through its own socket with
``await tts.register_voice("alice", "alice.wav")``.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

from pipecat_chatterbox.client import (
    DEFAULT_URL,
    REPLY_TYPES,
    ChatterboxClient,
    error_from_message,
)

__all__ = [
    "DEFAULT_URL",
    "REPLY_TYPES",
    "build_register_voice_message",
    "delete_voice",
    "list_voices",
    "register_voice",
    "reply_error",
    "send_voice_request",
]


async def build_register_voice_message(voice_id: str, wav_path: str | Path) -> dict[str, Any]:
    """Build a ``register_voice`` message from a WAV file.

    Args:
        voice_id: The id to register the voice under (``^[A-Za-z0-9_-]{1,64}$``).
        wav_path: Path to the reference recording, a WAV file of 3 to 30 seconds.

    Returns:
        The protocol message, with the file's bytes in base64.
    """
    data = await asyncio.to_thread(Path(wav_path).read_bytes)
    return {
        "type": "register_voice",
        "voice_id": voice_id,
        "reference_audio": base64.b64encode(data).decode("ascii"),
    }


def reply_error(message: dict[str, Any]) -> Exception:
    """Turn an ``error`` message into the exception a voice request raises.

    Args:
        message: The sidecar's ``error`` message.

    Returns:
        The typed error for its code.
    """
    return error_from_message(message)


async def send_voice_request(
    url: str, message: dict[str, Any], api_key: str | None, timeout: float
) -> dict[str, Any]:
    """Send one voice request on a connection of its own and wait for the reply.

    Args:
        url: The sidecar's websocket URL.
        message: The request.
        api_key: The sidecar's API key, if it has one.
        timeout: Seconds to wait for the connection and the reply together.

    Returns:
        The reply message.

    Raises:
        ChatterboxError: The sidecar refused the key (code ``unauthorized``), answered with an
            ``error``, or cannot be reached (``connection_failed``).
        TimeoutError: No reply within ``timeout``.
    """
    client = ChatterboxClient(url, api_key, open_timeout=timeout, request_timeout=timeout)
    try:
        async with asyncio.timeout(timeout):
            return await client.voice_request(message)
    finally:
        await client.close()


async def register_voice(
    url: str,
    voice_id: str,
    wav_path: str | Path,
    api_key: str | None = None,
    *,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Register a voice on the sidecar from a reference WAV file.

    The sidecar validates the recording (a real WAV of 3 to 30 seconds, any rate, mono or
    stereo) and stores it under ``voices/<voice_id>/``; a registered voice survives a
    restart. Engines that cannot clone (the CPU ``piper`` engine) store it all the same but
    answer ``unsupported`` when asked to speak with it.

    Args:
        url: The sidecar's websocket URL, e.g. ``ws://localhost:8002/v1/stream/tts``.
        voice_id: The id to register the voice under (``^[A-Za-z0-9_-]{1,64}$``).
        wav_path: Path to the reference recording.
        api_key: The sidecar's API key, if it has one.
        timeout: Seconds to wait for the sidecar's reply.

    Returns:
        The sidecar's ``voice_registered`` reply.

    Raises:
        ChatterboxError: The sidecar rejected the voice (``invalid_audio``,
            ``invalid_request``, ...) or the API key (``unauthorized``).
    """
    message = await build_register_voice_message(voice_id, wav_path)
    return await send_voice_request(url, message, api_key, timeout)


async def delete_voice(
    url: str, voice_id: str, api_key: str | None = None, *, timeout: float = 10.0
) -> dict[str, Any]:
    """Delete a registered voice.

    Args:
        url: The sidecar's websocket URL.
        voice_id: The voice to delete.
        api_key: The sidecar's API key, if it has one.
        timeout: Seconds to wait for the sidecar's reply.

    Returns:
        The sidecar's ``voice_deleted`` reply.

    Raises:
        ChatterboxError: For example ``voice_not_found``.
    """
    message = {"type": "delete_voice", "voice_id": voice_id}
    return await send_voice_request(url, message, api_key, timeout)


async def list_voices(
    url: str, api_key: str | None = None, *, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """List the voices the sidecar knows.

    Args:
        url: The sidecar's websocket URL.
        api_key: The sidecar's API key, if it has one.
        timeout: Seconds to wait for the sidecar's reply.

    Returns:
        The ``voices`` field of the sidecar's reply.
    """
    reply = await send_voice_request(url, {"type": "list_voices"}, api_key, timeout)
    return list(reply.get("voices", []))
