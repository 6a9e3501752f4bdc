"""The Pipecat service's ``language`` setting: Pipecat's ``Language`` mapped to the sidecar's
ISO 639-1 code (as Cartesia's service maps it), sent with each context, and a language the
sidecar's model lacks reported as that turn's ``unsupported`` error."""

from __future__ import annotations

import pytest
from pipecat.frames.frames import (
    ErrorFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.transcriptions.language import Language
from pipecat_chatterbox import ChatterboxTTSService, SidecarError, language_to_chatterbox_language
from pipecat_chatterbox.tts import CHATTERBOX_LANGUAGES

from .helpers import RecordingChatterboxTTSService, audio_of, of_type


@pytest.mark.parametrize(
    "language, code",
    [(Language.EN, "en"), (Language.EN_US, "en"), (Language.ES_MX, "es"), (Language.PT_BR, "pt"),
     (Language.ZH_TW, "zh"), (Language.CMN_CN, "zh"), (Language.NB_NO, "no"), (Language.NN, "no"),
     (Language.HE_IL, "he"), (Language.HI_IN, "hi"), (Language.SW_KE, "sw"), (Language.MS, "ms"),
     (Language.AR_EG, "ar"), (Language.JA_JP, "ja"), (Language.KO_KR, "ko")],
)  # fmt: skip
def test_pipecat_languages_map_to_chatterbox_codes(language, code):
    assert language_to_chatterbox_language(language) == code


def test_every_chatterbox_language_has_its_pipecat_language():
    assert {language_to_chatterbox_language(Language(code)) for code in CHATTERBOX_LANGUAGES} == (
        set(CHATTERBOX_LANGUAGES)
    )
    # one the model does not speak goes out as its base code; the sidecar then refuses it
    assert language_to_chatterbox_language(Language.VI_VN) == "vi"


def test_the_setting_is_converted_when_the_service_is_made():
    tts = ChatterboxTTSService(settings=ChatterboxTTSService.Settings(language=Language.DE_CH))
    assert tts._settings.language == "de"
    assert ChatterboxTTSService()._settings.language is None  # the sidecar's default


async def test_language_goes_with_each_context_and_a_lacking_one_fails_its_turn(sidecar):
    Settings = ChatterboxTTSService.Settings
    tts = RecordingChatterboxTTSService(url=sidecar.url, settings=Settings(language=Language.EN_GB))
    down, up = await run_test(
        tts,
        frames_to_send=[
            TTSSpeakFrame("First."),
            SleepFrame(0.5),
            # the piper engine speaks English only
            TTSUpdateSettingsFrame(delta=Settings(language=Language.ES)),
            TTSSpeakFrame("Segundo."),
            SleepFrame(0.5),
            TTSUpdateSettingsFrame(delta=Settings(language=Language.EN)),
            TTSSpeakFrame("Third."),
            SleepFrame(0.5),
        ],
        pipeline_params=PipelineParams(audio_out_sample_rate=16000),
    )
    synths = tts.sent_of("synthesize")
    assert [m["language"] for m in synths] == ["en", "es", "en"]
    assert len({m["context_id"] for m in synths}) == 3  # a language change opens a new context
    echoes = {m["context_id"]: m for m in tts.received_of("started")}
    assert echoes[synths[0]["context_id"]]["language"] == "en"
    errors = [f for f in of_type(up, ErrorFrame) if isinstance(f.exception, SidecarError)]
    assert [(f.exception.code, f.exception.context_id) for f in errors] == [
        ("unsupported", synths[1]["context_id"])
    ]
    assert "'es'" in errors[0].error
    assert len(of_type(down, TTSStartedFrame)) == len(of_type(down, TTSStoppedFrame)) == 3
    assert tts.is_usable
    assert audio_of(down, synths[2]["context_id"]).size > 0
