"""Issue 12: the server's own view of continuity: underruns per context, on /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from chatterbox_sidecar.app import App
from chatterbox_sidecar.config import SidecarConfig
from chatterbox_sidecar.engines.base import SynthesisParams
from chatterbox_sidecar.engines.piper import PiperEngine
from chatterbox_sidecar.server import SidecarServer
from chatterbox_sidecar.session import Playback
from chatterbox_sidecar.voices import Voice, VoiceStore

from tests.client import TTSClient


def test_chunks_in_time_play_without_a_gap():
    playback = Playback(bytes_per_second=1000)
    for i in range(10):
        playback.sent(500, now=10.0 + i * 0.5)  # each half second of audio exactly on time
    assert (playback.underruns, playback.longest_gap) == (0, 0.0)


def test_a_late_chunk_is_one_gap_and_playback_resumes_from_it():
    playback = Playback(bytes_per_second=1000)
    playback.sent(1000, now=0.0)  # 1 s of audio
    playback.sent(1000, now=1.3)  # due at 1.0: a 0.3 s gap
    playback.sent(1000, now=2.3)  # due at 2.3 after the wait: on time
    playback.sent(1000, now=3.32)  # 20 ms late: the player waits, no gap heard
    playback.sent(1000, now=4.40)  # due at 4.32: 80 ms late, a gap
    assert playback.underruns == 2
    assert playback.underrun_seconds == pytest.approx(0.38)
    assert playback.longest_gap == pytest.approx(0.3)


class StutteringPiperEngine(PiperEngine):
    """The real piper engine, holding back every chunk after the first by 1.2 s."""

    async def synthesize(
        self, segments: AsyncIterator[str], params: SynthesisParams, voice: Voice | None
    ) -> AsyncIterator[np.ndarray]:
        index = 0
        async for chunk in super().synthesize(segments, params, voice):
            if index:
                await asyncio.sleep(1.2)
            index += 1
            yield chunk


@pytest.fixture
async def stuttering_server(tmp_path: Path):
    config = SidecarConfig(host="127.0.0.1", port=0, voices_dir=tmp_path / "voices")
    app = App(config, StutteringPiperEngine(max_concurrency=1), VoiceStore(config.voices_dir))
    server = SidecarServer(app)
    await server.start()
    await app.start_engine()
    yield app, f"ws://127.0.0.1:{server.port}/v1/stream/tts"
    await server.close()
    await app.engine.close()


async def test_underruns_reach_the_metrics(stuttering_server):
    app, url = stuttering_server
    async with await TTSClient.connect(url) as client:
        smooth = await client.synthesize("Hi.")  # one segment: nothing to wait for
        assert smooth.end["type"] == "done"
        assert app.metrics.gap_free._value.get() == 1
        assert app.metrics.underruns._value.get() == 0
        # three short sentences (~0.5 s each, 0.12 s pauses between): each chunk after the
        # first comes 1.2 s after the one before, so playback runs dry
        result = await client.synthesize("Yes. No. Maybe.")
        assert result.end["type"] == "done"
    assert app.metrics.underruns._value.get() >= 1
    assert app.metrics.underrun_seconds._value.get() > 0.5
    assert app.metrics.gap_free._value.get() == 1
    assert b"tts_underruns_total" in app.metrics.render()
