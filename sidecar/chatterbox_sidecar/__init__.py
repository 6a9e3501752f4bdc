"""Streaming TTS sidecar: websocket server, engines and voice store."""

__version__ = "0.1.0"
