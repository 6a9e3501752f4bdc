"""Voice management over the sidecar websocket: register, delete and list voices.

These functions open a short-lived connection of their own, for scripts and for setting a
bot up before its pipeline runs::

    from pipecat_chatterbox import register_voice

    await register_voice("ws://localhost:8002/v1/stream/tts", "alice", "alice.wav")

A running :class:`~pipecat_chatterbox.tts.ChatterboxTTSService` does the same through its own
socket with ``await tts.register_voice("alice", "alice.wav")``.
"""

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

from loguru import logger
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from pipecat_chatterbox.errors import UNAUTHORIZED, SidecarError, auth_headers

DEFAULT_URL = "ws://localhost:8002/v1/stream/tts"

# Replies that answer each voice request.
REPLY_TYPES = {
    "register_voice": "voice_registered",
    "delete_voice": "voice_deleted",
    "list_voices": "voices",
}

# A 30 s stereo 48 kHz reference WAV is ~11 MiB in base64; the sidecar announces 16 MiB.
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


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


def reply_error(message: dict[str, Any]) -> SidecarError:
    """Turn an ``error`` message into the exception a voice request raises.

    Args:
        message: The sidecar's ``error`` message.

    Returns:
        The matching :class:`SidecarError`.
    """
    return SidecarError(
        str(message.get("code", "unknown")),
        str(message.get("message", "")),
        message.get("context_id"),
    )


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
        SidecarError: The sidecar refused the key (code ``unauthorized``) or answered with
            an ``error``.
        TimeoutError: No reply within ``timeout``.
        OSError: The sidecar cannot be reached.
    """
    expected = REPLY_TYPES[message["type"]]
    try:
        async with asyncio.timeout(timeout):
            async with connect(
                url,
                additional_headers=auth_headers(api_key),
                max_size=_MAX_MESSAGE_BYTES,
                compression=None,
            ) as ws:
                await ws.send(json.dumps(message))
                async for raw in ws:
                    if isinstance(raw, bytes):
                        continue
                    reply = json.loads(raw)
                    if reply.get("type") == expected:
                        return reply
                    if reply.get("type") == "error":
                        raise reply_error(reply)
                    logger.trace(f"voice request: skipping {reply.get('type')} message")
    except InvalidStatus as e:
        status = e.response.status_code
        if status in (401, 403):
            raise SidecarError(
                UNAUTHORIZED,
                f"the sidecar at {url} refused the API key (HTTP {status}); "
                "pass the sidecar's TTS_API_KEY as api_key",
            ) from e
        raise
    raise ConnectionError(f"the sidecar at {url} closed the connection before replying")


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
        SidecarError: The sidecar rejected the voice (``invalid_audio``,
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
        SidecarError: For example ``voice_not_found``.
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
