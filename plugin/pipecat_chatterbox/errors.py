"""Errors reported by the chatterbox sidecar, and what they mean to Pipecat.

This module needs no Pipecat: the voice helpers use it from a plain sidecar install. Pipecat's
``ErrorCategory`` is imported only when a category is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipecat_chatterbox.client import ChatterboxError

if TYPE_CHECKING:
    from pipecat.utils.errors import ErrorCategory

# The sidecar answered the websocket upgrade with 401 or 403: the API key is wrong or missing.
UNAUTHORIZED = "unauthorized"

# How each protocol error code is reported to Pipecat, by ``ErrorCategory`` value. Only a
# refused key is permanent (``ErrorCategory.is_permanent``): it makes the service unusable,
# and every further request would fail the same way. A voice that does not exist or that the
# engine cannot speak (``voice_not_found``, ``unsupported``) fails that turn only: it is the
# application's choice, says nothing about the sidecar's health, and the next turn with a good
# voice speaks, so it is ``application`` like text that is too long.
_CATEGORIES: dict[str, str] = {
    UNAUTHORIZED: "authentication",
    "voice_not_found": "application",
    "unsupported": "application",
    "text_too_long": "application",
    "invalid_audio": "application",
    "busy": "rate_limit",
    "not_ready": "server",
    "engine_error": "server",
    "internal_error": "server",
}


# An error reply from the sidecar, or a refused connection: the client's error type, so that
# ``except SidecarError`` catches what the voice helpers, the client and the service raise alike
# (``.code``, ``.message``, ``.context_id``); its Pipecat category is ``category_for_code``.
SidecarError = ChatterboxError


def category_for_code(code: str) -> ErrorCategory:
    """Map a sidecar error code to a Pipecat error category.

    Args:
        code: The protocol error code.

    Returns:
        The category; ``ErrorCategory.UNKNOWN`` (not permanent) for codes with no mapping.
    """
    from pipecat.utils.errors import ErrorCategory

    return ErrorCategory(_CATEGORIES.get(code, ErrorCategory.UNKNOWN.value))


def auth_headers(api_key: str | None) -> dict[str, str]:
    """Build the websocket upgrade headers that carry an API key.

    Args:
        api_key: The sidecar's ``TTS_API_KEY``, or None for an open sidecar.

    Returns:
        ``{"Authorization": "Bearer <key>"}``, or an empty dict without a key.
    """
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
