"""Pipecat service for the chatterbox sidecar.

``ChatterboxTTSService`` is a drop-in websocket TTS node for Pipecat pipelines that speaks
through a self-hosted sidecar (``python -m chatterbox_sidecar``). ``register_voice``,
``delete_voice`` and ``list_voices`` manage the sidecar's voices from scripts; they need only
the ``websockets`` client, so they work from a plain sidecar install without pipecat-ai.
"""

from typing import TYPE_CHECKING, Any

from pipecat_chatterbox.errors import SidecarError
from pipecat_chatterbox.voices import delete_voice, list_voices, register_voice

if TYPE_CHECKING:
    from pipecat_chatterbox.tts import (
        ChatterboxTTSService,
        ChatterboxTTSSettings,
        language_to_chatterbox_language,
    )

__all__ = [
    "ChatterboxTTSService",
    "ChatterboxTTSSettings",
    "SidecarError",
    "delete_voice",
    "language_to_chatterbox_language",
    "list_voices",
    "register_voice",
]

# Imported on first use, so that the voice helpers do not need pipecat-ai.
_SERVICE_NAMES = frozenset(
    {"ChatterboxTTSService", "ChatterboxTTSSettings", "language_to_chatterbox_language"}
)


def __getattr__(name: str) -> Any:
    """Import the Pipecat service when it is first asked for."""
    if name in _SERVICE_NAMES:
        try:
            from pipecat_chatterbox import tts
        except ModuleNotFoundError as e:
            if e.name != "pipecat" and not (e.name or "").startswith("pipecat."):
                raise
            raise ImportError(
                f"pipecat_chatterbox.{name} needs pipecat-ai: "
                'pip install -e ".[pipecat]" (in a clone of pipecat-chatterbox)'
            ) from e
        return getattr(tts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
