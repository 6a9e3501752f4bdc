"""The chatterbox engine's own lateness: a playing listener given audio late, and the ``busy``
the server answers meanwhile (on CPU, where S3Gen at full size is slower than real time, so
every chunk after a stream's first comes late)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_asyncio
from chatterbox_sidecar.app import App
from chatterbox_sidecar.config import ConfigError, SidecarConfig
from chatterbox_sidecar.engines import create_engine
from chatterbox_sidecar.engines.base import SynthesisParams
from chatterbox_sidecar.engines.chatterbox import ChatterboxEngine
from chatterbox_sidecar.engines.chatterbox.engine import CUDA_OVERLOAD_HOLD_S, _Playback
from chatterbox_sidecar.server import SidecarServer
from chatterbox_sidecar.voices import VoiceStore

from tests.client import TTSClient

from .test_engine import collect, engine_config, scripted_model_dir, segments  # noqa: F401

pytestmark = [pytest.mark.torch]

TEXT = "Hello there, my friend."  # 100 tokens: four chunks at hops 10, 25, 50, 15


def test_only_a_wait_that_began_after_the_text_came_is_the_engines():
    playback = _Playback()
    assert playback.emit(0.5, now=10.0, asked_at=10.0) == 0  # the first chunk: no listener yet
    assert playback.emit(0.5, now=10.4, asked_at=10.0) == 0  # before 10.5: in time
    # due at 11.0, with the piece's text there since 10.0: the engine kept the listener waiting
    assert playback.emit(0.5, now=11.3, asked_at=10.0) == pytest.approx(0.3)
    # playback resumed at 11.3 with that chunk: it runs dry at 11.8, not at 11.5
    assert playback.dry_at(11.3) == pytest.approx(11.8)
    # The next piece's text came at 13.0, after the listener ran dry: its first chunk is not
    # late on the engine's account, and the deadlines after it start from when it came.
    assert playback.emit(0.5, now=13.4, asked_at=13.0) == 0
    assert playback.dry_at(13.0) == pytest.approx(13.9)
    assert playback.emit(0.5, now=13.85, asked_at=13.0) == 0
    # Text that came 0.1 s before the end of the audio (14.35): its first chunk has until
    # 0.25 s after the text (14.5) before the wait is the engine's.
    assert playback.emit(0.5, now=14.45, asked_at=14.25) == 0
    assert playback.dry_at(14.25) == pytest.approx(14.95)
    assert playback.emit(0.5, now=15.4, asked_at=14.9) == pytest.approx(0.25)  # due at 15.15


def test_a_consumer_that_holds_the_engine_is_not_the_engines_lateness():
    playback = _Playback()
    playback.emit(1.0, now=0.0, asked_at=0.0)
    playback.held(5.0)  # the context's audio queue was full: the client is far behind
    assert playback.emit(1.0, now=5.5, asked_at=0.0) == 0
    assert playback.dry_at(0.0) == pytest.approx(7.0)


def test_hold_setting_reaches_the_engine(tmp_path):
    env = {"TTS_ENGINE": "chatterbox", "TTS_DEVICE": "cpu", "TTS_MODEL_DIR": str(tmp_path)}
    cfg = create_engine(SidecarConfig.from_env(env)).config
    assert cfg.overload_hold_seconds is None and cfg.resolved_overload_hold() == 0  # CPU
    cuda = create_engine(SidecarConfig.from_env({**env, "TTS_DEVICE": "cuda"})).config
    assert cuda.resolved_overload_hold() == CUDA_OVERLOAD_HOLD_S
    env["TTS_OVERLOAD_HOLD_SECONDS"] = "12.5"
    assert create_engine(SidecarConfig.from_env(env)).config.resolved_overload_hold() == 12.5
    env["TTS_OVERLOAD_HOLD_SECONDS"] = "0"
    off = create_engine(SidecarConfig.from_env({**env, "TTS_DEVICE": "cuda"})).config
    assert off.resolved_overload_hold() == 0
    env["TTS_OVERLOAD_HOLD_SECONDS"] = "soon"
    with pytest.raises(ConfigError, match="TTS_OVERLOAD_HOLD_SECONDS must be a number"):
        SidecarConfig.from_env(env)


@pytest_asyncio.fixture
async def held_server(scripted_model_dir: Path, tmp_path: Path):  # noqa: F811
    """The chatterbox engine on CPU holding ``falling_behind`` 60 s, behind the real server."""
    config = SidecarConfig(host="127.0.0.1", port=0, voices_dir=tmp_path / "voices")
    engine = ChatterboxEngine(engine_config(scripted_model_dir, overload_hold_seconds=60.0))
    app = App(config, engine, VoiceStore(config.voices_dir))
    server = SidecarServer(app)
    await server.start()
    await app.start_engine()
    yield app, server.port
    await server.close()
    await engine.close()


async def test_a_late_stream_turns_new_streams_away(held_server):
    app, port = held_server
    engine = app.engine
    assert not engine.falling_behind and app.status == "ready"
    async with await TTSClient.connect(f"ws://127.0.0.1:{port}/v1/stream/tts") as client:
        late = await client.synthesize(TEXT, context_id="late")
        assert late.end["type"] == "done"  # the stream itself is spoken to its end
        assert engine.counters()["late_chunks"] >= 1
        assert engine.falling_behind
        assert app.status == "falling_behind" and not app.healthy  # /health/ready: 503
        refused = await client.synthesize("Hi.", context_id="next")
        assert refused.end["type"] == "error" and refused.end["code"] == "busy"
        assert "falling behind" in refused.end["message"]
        # the connection stays usable, and so does the server once the hold is over
        engine._behind_until = 0.0
        again = await client.synthesize("Hi.", context_id="again")
        assert again.end["type"] == "done"
    assert b"tts_engine_late_chunks_total" in app.metrics.render()


async def test_late_chunks_are_counted_but_turn_nobody_away_with_no_hold(scripted_model_dir):  # noqa: F811
    engine = ChatterboxEngine(engine_config(scripted_model_dir))  # CPU default: no hold
    await engine.start()
    try:
        await collect(engine.synthesize(segments(TEXT), SynthesisParams(), None))
        assert engine.counters()["late_chunks"] >= 1
        assert not engine.falling_behind
    finally:
        await engine.close()
