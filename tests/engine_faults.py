"""Fault injection at the engine boundary, for tests: the real piper engine, failing on cue.

Faults that cannot be made to happen here (a CUDA device fault) or on purpose (an engine bug)
enter where the engine reads its text segments: ``fault(segment)`` returns the exception to
raise for that segment, or None to speak it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from chatterbox_sidecar.app import App
from chatterbox_sidecar.config import SidecarConfig
from chatterbox_sidecar.engines.base import SynthesisParams
from chatterbox_sidecar.engines.piper import PiperEngine
from chatterbox_sidecar.server import SidecarServer
from chatterbox_sidecar.voices import Voice, VoiceStore

Fault = Callable[[str], BaseException | None]


class FaultInjectingPiperEngine(PiperEngine):
    """The real piper engine, raising ``fault(segment)`` where it returns an exception."""

    def __init__(self, fault: Fault, max_concurrency: int = 0):
        super().__init__(max_concurrency=max_concurrency)
        self._fault = fault

    async def synthesize(
        self, segments: AsyncIterator[str], params: SynthesisParams, voice: Voice | None
    ) -> AsyncIterator[np.ndarray]:
        async for chunk in super().synthesize(self._check(segments), params, voice):
            yield chunk

    async def _check(self, segments: AsyncIterator[str]) -> AsyncIterator[str]:
        async for segment in segments:
            error = self._fault(segment)
            if error is not None:
                raise error
            yield segment


@asynccontextmanager
async def inprocess_sidecar(engine: PiperEngine, tmp_path: Path):
    """An in-process sidecar on a free loopback port around ``engine``: yields (app, port)."""
    config = SidecarConfig(host="127.0.0.1", port=0, voices_dir=tmp_path / "voices")
    app = App(config, engine, VoiceStore(config.voices_dir))
    server = SidecarServer(app)
    await server.start()
    await app.start_engine()
    try:
        yield app, server.port
    finally:
        await server.close()
        await app.engine.close()
