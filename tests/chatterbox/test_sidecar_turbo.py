"""The sidecar with TTS_MODEL=chatterbox-turbo on CPU, over protocol v1: Turbo's T3 (scripted
checkpoint in the real layout) and meanflow S3Gen (random), loaded through the users' path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from chatterbox_sidecar.engines.chatterbox.model_files import speech_token_budget
from chatterbox_sidecar.engines.chatterbox.models import TURBO_TAGS
from chatterbox_sidecar.engines.chatterbox.s3gen.stream import SAMPLES_PER_TOKEN
from chatterbox_sidecar.text import split_text

from tests.client import TTSClient

from .test_conditionals import voice_like
from .turbo_checkpoint import write_turbo_model_dir

# slow: every sidecar start loads full-size S3Gen and warms it up
pytestmark = [pytest.mark.torch, pytest.mark.slow]

SCRIPT = torch.randperm(6561, generator=torch.Generator().manual_seed(12))[:120].tolist()
SILENCE = 3  # Turbo ends every utterance on three S3Gen silence tokens


@pytest.fixture(scope="module")
def model_dir(meanflow_model_dir: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sidecar-turbo")
    return write_turbo_model_dir(folder, meanflow_model_dir, [*SCRIPT, 6562], n_layers=1)


def turbo_env(model_dir: Path) -> dict[str, str]:
    return {
        "TTS_ENGINE": "chatterbox",
        "TTS_MODEL": "chatterbox-turbo",
        "TTS_MODEL_DIR": str(model_dir),
        "TTS_DEVICE": "cpu",
        "TTS_CHUNK_SIZE": "25",
        "TTS_CONTEXT_WINDOW": "25",
    }


def expected_samples(text: str, rate: int = 24000) -> float:
    tokens = sum(
        min(speech_token_budget(s), len(SCRIPT)) + SILENCE
        for s in split_text(text, keep_tags=TURBO_TAGS)
    )
    return tokens * SAMPLES_PER_TOKEN * rate / 24000


async def test_turbo_speaks_through_the_websocket(sidecar_factory, model_dir):
    sidecar = sidecar_factory(**turbo_env(model_dir))
    async with await TTSClient.connect(sidecar.url) as client:
        ready = client.ready
        assert ready["engine"] == "chatterbox" and ready["model"] == "chatterbox-turbo"
        assert ready["languages"] == ["en"] and ready["parameters"] == ["temperature", "seed"]
        assert "[laugh]" in ready["tags"]
        text = "Hi there [laugh] you. And a second sentence [sigh] follows here."
        result = await client.synthesize(text, context_id="a", exaggeration=0.7, cfg_weight=0.3)
        assert result.end["type"] == "done", result.end
        # echoed as sent, and reported as not applied: Turbo has no guidance and no emotion input
        assert result.started["exaggeration"] == 0.7
        assert result.started["not_applied"] == ["exaggeration", "cfg_weight"]
        n = len(result.audio_bytes) // 4
        assert len(result.chunks) > 2  # streamed in chunks
        assert n == pytest.approx(expected_samples(text), abs=1)
        assert 0.001 < float(abs(result.audio()).max()) <= 1.0
        whole = await client.synthesize(
            text, context_id="b", sample_rate=8000, encoding="pcm_mulaw", streaming=False
        )
        assert whole.end["type"] == "done" and whole.started["streaming"] is False
        assert len(whole.audio_bytes) == pytest.approx(expected_samples(text, 8000), abs=2)
    # the Pipecat service speaks through Turbo, its tag kept
    from pipecat.frames.frames import TTSSpeakFrame
    from pipecat.pipeline.worker import PipelineParams
    from pipecat.tests.utils import run_test

    from tests.plugin.helpers import RecordingChatterboxTTSService, audio_of

    text = "Hi there [laugh] you."
    # CPU S3Gen on a loaded 2-core machine: chunks can come seconds apart
    tts = RecordingChatterboxTTSService(url=sidecar.url, stop_frame_timeout_s=60)
    down, _ = await run_test(
        tts,
        frames_to_send=[TTSSpeakFrame(text)],
        pipeline_params=PipelineParams(audio_out_sample_rate=24000),
    )
    assert "".join(m["text"] for m in tts.sent_of("synthesize")).strip() == text
    assert audio_of(down).size == pytest.approx(expected_samples(text), abs=1)


async def test_turbo_voice_registration_keeps_its_own_conditionals(sidecar_factory, model_dir):
    sidecar = sidecar_factory(**turbo_env(model_dir))
    async with await TTSClient.connect(sidecar.url) as client:
        reply = await client.register_voice("dora", (voice_like(6.0, 22050, seed=5), 22050))
        assert reply["type"] == "voice_registered", reply
        # Turbo's T3 prompt comes from up to 15 s of reference: a file of its own, so a voice
        # registered under one model never feeds another model the wrong prompt length
        assert (sidecar.voices_dir / "dora" / "conds-turbo.pt").exists()
        assert not (sidecar.voices_dir / "dora" / "conds.pt").exists()
        result = await client.synthesize("Hi.", context_id="v", voice_id="dora")
        assert result.end["type"] == "done"
        assert len(result.audio_bytes) // 4 == pytest.approx(expected_samples("Hi."), abs=1)
