"""Pipecat service for the chatterbox sidecar.

``ChatterboxTTSService`` is a drop-in websocket TTS node for Pipecat pipelines that speaks
through a self-hosted sidecar (``python -m chatterbox_sidecar``). ``register_voice``,
``delete_voice`` and ``list_voices`` manage the sidecar's voices from scripts.
"""

from pipecat_chatterbox.errors import SidecarError
from pipecat_chatterbox.tts import ChatterboxTTSService, ChatterboxTTSSettings
from pipecat_chatterbox.voices import delete_voice, list_voices, register_voice

__all__ = [
    "ChatterboxTTSService",
    "ChatterboxTTSSettings",
    "SidecarError",
    "delete_voice",
    "list_voices",
    "register_voice",
]
