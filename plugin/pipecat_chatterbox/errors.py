"""Errors reported by the chatterbox sidecar, and what they mean to Pipecat."""

from pipecat.utils.errors import ErrorCategory

# The sidecar answered the websocket upgrade with 401 or 403: the API key is wrong or missing.
UNAUTHORIZED = "unauthorized"

# How each protocol error code is reported to Pipecat. A permanent category (see
# ``ErrorCategory.is_permanent``) makes the service unusable until its settings change, which
# is right for a voice that does not exist or that this engine cannot speak: every further
# request would fail the same way until the application picks another voice. Codes that
# concern one request only (too much text, one malformed message) are not permanent.
_CATEGORIES: dict[str, ErrorCategory] = {
    UNAUTHORIZED: ErrorCategory.AUTHENTICATION,
    "voice_not_found": ErrorCategory.INVALID_REQUEST,
    "unsupported": ErrorCategory.INVALID_REQUEST,
    "busy": ErrorCategory.RATE_LIMIT,
    "engine_error": ErrorCategory.SERVER,
    "invalid_audio": ErrorCategory.APPLICATION,
    "text_too_long": ErrorCategory.APPLICATION,
}


class SidecarError(Exception):
    """An ``error`` reply from the sidecar, or a refused connection.

    Parameters:
        code: The protocol's stable error code (``voice_not_found``, ``unsupported``,
            ``invalid_request``, ``text_too_long``, ``busy``, ``engine_error``, ...), or
            ``unauthorized`` when the sidecar refused the API key.
        message: The sidecar's human-readable explanation.
        context_id: The context the error ended, if it concerned one.
    """

    def __init__(self, code: str, message: str, context_id: str | None = None):
        """Initialize the error.

        Args:
            code: The protocol error code.
            message: The human-readable explanation.
            context_id: The context the error ended, if any.
        """
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.context_id = context_id

    @property
    def category(self) -> ErrorCategory:
        """Returns: the Pipecat error category for this error's code."""
        return category_for_code(self.code)


def category_for_code(code: str) -> ErrorCategory:
    """Map a sidecar error code to a Pipecat error category.

    Args:
        code: The protocol error code.

    Returns:
        The category; ``ErrorCategory.UNKNOWN`` (not permanent) for codes with no mapping.
    """
    return _CATEGORIES.get(code, ErrorCategory.UNKNOWN)


def auth_headers(api_key: str | None) -> dict[str, str]:
    """Build the websocket upgrade headers that carry an API key.

    Args:
        api_key: The sidecar's ``TTS_API_KEY``, or None for an open sidecar.

    Returns:
        ``{"Authorization": "Bearer <key>"}``, or an empty dict without a key.
    """
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
