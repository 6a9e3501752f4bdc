"""The sidecar with TTS_MODEL=chatterbox-multilingual on CPU, over protocol v1 and HTTP: T3
Multilingual (scripted checkpoint with the 2454-entry text vocabulary, real tokenizer) and the
Original's S3Gen (random), loaded through the users' path."""

from __future__ import annotations

import io
import json
import urllib.parse
from pathlib import Path

import pytest
import soundfile as sf
import torch
from chatterbox_sidecar.engines.chatterbox.model_files import speech_token_budget
from chatterbox_sidecar.engines.chatterbox.models import MULTILINGUAL_LANGUAGES
from chatterbox_sidecar.engines.chatterbox.s3gen.stream import SAMPLES_PER_TOKEN
from chatterbox_sidecar.text import split_text

from tests.client import TTSClient

from .mtl_checkpoint import write_mtl_model_dir
from .test_conditionals import voice_like

# slow: every sidecar start loads full-size S3Gen and warms it up
pytestmark = [pytest.mark.torch, pytest.mark.slow]

SCRIPT = torch.randperm(6561, generator=torch.Generator().manual_seed(13))[:100].tolist()


@pytest.fixture(scope="module")
def model_dir(s3gen_model_dir: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sidecar-multilingual")
    return write_mtl_model_dir(folder, s3gen_model_dir, [*SCRIPT, 6562], n_layers=1)


def multilingual_env(model_dir: Path) -> dict[str, str]:
    return {
        "TTS_ENGINE": "chatterbox",
        "TTS_MODEL": "chatterbox-multilingual",
        "TTS_MODEL_DIR": str(model_dir),
        "TTS_DEVICE": "cpu",
        "TTS_FLOW_STEPS": "2",
        "TTS_CHUNK_SIZE": "25",
        "TTS_CONTEXT_WINDOW": "25",
    }


def expected_samples(text: str, language: str, rate: int = 24000) -> float:
    # each utterance's last token is dropped, as upstream's multilingual model does
    tokens = sum(
        min(speech_token_budget(s), len(SCRIPT)) - 1 for s in split_text(text, language=language)
    )
    return tokens * SAMPLES_PER_TOKEN * rate / 24000


async def test_multilingual_speaks_each_language_it_is_asked_for(sidecar_factory, model_dir):
    sidecar = sidecar_factory(**multilingual_env(model_dir))
    async with await TTSClient.connect(sidecar.url) as client:
        ready = client.ready
        assert ready["model"] == "chatterbox-multilingual"
        assert set(ready["languages"]) >= set(MULTILINGUAL_LANGUAGES) - {"ja"}  # ja: pykakasi
        assert ready["default_language"] == "en"
        text = "Hola, ¿cómo estás? Tengo 3 gatos."
        result = await client.synthesize(text, context_id="es", language="es")
        assert result.end["type"] == "done", result.end
        assert result.started["language"] == "es"
        assert len(result.audio_bytes) // 4 == pytest.approx(expected_samples(text, "es"), abs=1)
        # a language the model lacks ends its context only
        refused = await client.synthesize("Xin chào.", context_id="vi", language="vi")
        assert refused.end["code"] == "unsupported" and "'vi'" in refused.end["message"]
        bad = await client.synthesize("Hello.", context_id="x", language="english")
        assert bad.end["code"] == "invalid_request"
        # Chinese: sentences end at 。 and ！ with no space after them; a BCP 47 tag is read
        text = "你好世界。我很好！"
        chinese = await client.synthesize(text, context_id="zh", language="zh-Hant", seed=1)
        assert chinese.end["type"] == "done" and chinese.started["language"] == "zh"
        assert len(split_text(text, language="zh")) == 2
        n = len(chinese.audio_bytes) // 4
        assert n == pytest.approx(expected_samples(text, "zh"), abs=1)
        default = await client.synthesize("Hi there.", context_id="en", streaming=False)
        assert default.started["language"] == "en" and default.end["type"] == "done"
    # the language token reached T3's prompt: [es] is id 635, [zh] 725, [en] 708
    log = sidecar.log_text()
    for language, token in (("es", 635), ("zh", 725), ("en", 708)):
        assert f"T3 text: [{language}] is id {token}," in log
    # the one-shot HTTP route takes the language too
    query = urllib.parse.urlencode({"text": "Guten Tag, 12 Grad.", "language": "de"})
    status, body, _ = sidecar.get(f"/v1/synthesize?{query}")
    assert status == 200
    audio, rate = sf.read(io.BytesIO(body))
    assert len(audio) == pytest.approx(expected_samples("Guten Tag, 12 Grad.", "de"), abs=1)
    status, body, _ = sidecar.get("/v1/synthesize?text=Hello&language=vi")
    assert status == 400 and json.loads(body)["code"] == "unsupported"
    # the Pipecat service: its language setting picks the model's language
    from pipecat.frames.frames import TTSSpeakFrame
    from pipecat.pipeline.worker import PipelineParams
    from pipecat.tests.utils import run_test
    from pipecat.transcriptions.language import Language

    from tests.plugin.helpers import RecordingChatterboxTTSService, audio_of

    text = "Hola, ¿cómo estás?"
    tts = RecordingChatterboxTTSService(
        url=sidecar.url,
        settings=RecordingChatterboxTTSService.Settings(language=Language.ES_MX),
        stop_frame_timeout_s=60,  # CPU S3Gen on a loaded 2-core machine: chunks seconds apart
    )
    down, _ = await run_test(
        tts,
        frames_to_send=[TTSSpeakFrame(text)],
        pipeline_params=PipelineParams(audio_out_sample_rate=24000),
    )
    assert [m["language"] for m in tts.sent_of("synthesize")] == ["es"]
    assert [m["language"] for m in tts.received_of("started")] == ["es"]
    assert audio_of(down).size == pytest.approx(expected_samples(text, "es"), abs=1)


async def test_a_voice_shares_the_originals_conditionals(sidecar_factory, model_dir):
    sidecar = sidecar_factory(**multilingual_env(model_dir))
    async with await TTSClient.connect(sidecar.url) as client:
        reply = await client.register_voice("lena", (voice_like(6.0, 22050, seed=6), 22050))
        assert reply["type"] == "voice_registered", reply
        # conditioned as the Original is (6 s, 150 tokens): the same file serves both models
        assert (sidecar.voices_dir / "lena" / "conds.pt").exists()
        assert [p.name for p in (sidecar.voices_dir / "lena").glob("conds*.pt")] == ["conds.pt"]
        result = await client.synthesize("Bonjour.", context_id="v", voice_id="lena", language="fr")
        assert result.end["type"] == "done" and result.started["language"] == "fr"
        assert len(result.audio_bytes) // 4 == pytest.approx(
            expected_samples("Bonjour.", "fr"), abs=1
        )
