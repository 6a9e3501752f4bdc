"""ChatterboxTTSService in Pipecat pipelines against a real piper sidecar.

Pipecat's own ``run_test`` drives the real service over a loopback websocket; the audio that
comes out is checked with Whisper tiny.en.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from pipecat.frames.frames import (
    ErrorFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData, TTSUsageMetricsData
from pipecat.pipeline.worker import PipelineParams
from pipecat.services.tts_service import TextAggregationMode
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.utils.errors import ErrorCategory
from pipecat_chatterbox import (
    ChatterboxTTSService,
    SidecarError,
    delete_voice,
    list_voices,
    register_voice,
)

from tests.asr import transcribe, word_error_rate

from .helpers import (
    LivePipeline,
    RecordingChatterboxTTSService,
    audio_of,
    of_type,
    reference_wav,
    tts_sequence,
)

MAX_WER = 0.2
TTS_FRAMES = (TTSStartedFrame, TTSTextFrame, TTSAudioRawFrame, TTSStoppedFrame)


def params(rate: int, **kwargs) -> PipelineParams:
    return PipelineParams(audio_out_sample_rate=rate, **kwargs)


def assert_says(audio, rate: int, text: str) -> None:
    heard = transcribe(audio, rate)
    wer = word_error_rate(text, heard)
    assert wer <= MAX_WER, f"asked for {text!r}, heard {heard!r} (WER {wer:.2f})"


async def test_speak_frame_gives_expected_frames_and_words(sidecar):
    text = "The quick brown fox jumps over the lazy dog."
    tts = RecordingChatterboxTTSService(url=sidecar.url)
    start = time.monotonic()
    down, up = await run_test(
        tts,
        frames_to_send=[TTSSpeakFrame(text)],
        pipeline_params=params(16000),
    )
    elapsed = time.monotonic() - start

    assert not of_type(up, ErrorFrame), [f.error for f in of_type(up, ErrorFrame)]
    assert tts_sequence(down, TTS_FRAMES) == [
        "TTSStartedFrame",
        "TTSTextFrame",
        "TTSAudioRawFrame",
        "TTSStoppedFrame",
    ]
    (started,) = of_type(down, TTSStartedFrame)
    (stopped,) = of_type(down, TTSStoppedFrame)
    audio_frames = of_type(down, TTSAudioRawFrame)
    assert {f.sample_rate for f in audio_frames} == {16000}
    assert {f.num_channels for f in audio_frames} == {1}
    assert {f.context_id for f in audio_frames} == {started.context_id} == {stopped.context_id}

    # One sidecar context: the text with continue:true, then flush; the sidecar echoes the
    # format the plugin asked for and closes the context with done.
    (synth,) = tts.sent_of("synthesize")
    assert synth["context_id"] == started.context_id
    assert synth["continue"] is True and synth["text"] == text
    assert tts.sent_of("flush") == [{"type": "flush", "context_id": started.context_id}]
    (echo,) = tts.received_of("started")
    assert (echo["sample_rate"], echo["encoding"], echo["voice_id"]) == (
        16000,
        "pcm_s16le",
        "default",
    )
    assert [m["context_id"] for m in tts.received_of("done")] == [started.context_id]

    # EndFrame came right after the speak frame: the audio still came out in full, and
    # `done` ended the context at once rather than the base class's 3 s idle timeout.
    audio = audio_of(down)
    (done,) = tts.received_of("done")
    assert len(audio) / 16000 == pytest.approx(done["audio_seconds"], abs=0.01)
    assert elapsed < 3.0, f"run took {elapsed:.1f} s"
    assert_says(audio, 16000, text)


async def test_llm_turn_is_one_context_with_spaces_kept(sidecar):
    tokens = ["Hello", " there.", " How", " are", " you", " today?"]
    tts = RecordingChatterboxTTSService(url=sidecar.url)
    down, up = await run_test(
        tts,
        frames_to_send=[
            LLMFullResponseStartFrame(),
            *[LLMTextFrame(t) for t in tokens],
            LLMFullResponseEndFrame(),
        ],
        pipeline_params=params(8000),
    )

    assert not of_type(up, ErrorFrame), [f.error for f in of_type(up, ErrorFrame)]
    kinds = [type(f) for f in down if isinstance(f, (*TTS_FRAMES, *LLM_TURN))]
    assert kinds[0] is LLMFullResponseStartFrame and kinds[1] is TTSStartedFrame
    assert kinds[-2:] == [TTSStoppedFrame, LLMFullResponseEndFrame]
    assert kinds.count(TTSStartedFrame) == 1 and kinds.count(TTSStoppedFrame) == 1
    # One text frame per word, from the sidecar's timings, in order.
    words = of_type(down, TTSTextFrame)
    assert [f.text for f in words] == ["Hello", "there.", "How", "are", "you", "today?"]
    assert all(f.pts for f in words) and [f.pts for f in words] == sorted(f.pts for f in words)
    audio_frames = of_type(down, TTSAudioRawFrame)
    assert {f.sample_rate for f in audio_frames} == {8000}
    (started,) = of_type(down, TTSStartedFrame)
    assert {f.context_id for f in audio_frames} == {started.context_id}

    # Both sentences went to one sidecar context, joined with the space between them.
    synths = tts.sent_of("synthesize")
    assert {m["context_id"] for m in synths} == {started.context_id}
    assert "".join(m["text"] for m in synths) == "Hello there. How are you today?"
    assert all(m["continue"] and m["sample_rate"] == 8000 for m in synths)
    assert tts.sent[-1] == {"type": "flush", "context_id": started.context_id}
    assert_says(audio_of(down), 8000, "Hello there. How are you today?")


LLM_TURN = (LLMFullResponseStartFrame, LLMFullResponseEndFrame)


async def test_without_word_timestamps_one_text_frame_per_sentence(sidecar):
    tts = RecordingChatterboxTTSService(url=sidecar.url, word_timestamps=False)
    down, up = await run_test(
        tts,
        frames_to_send=[
            LLMFullResponseStartFrame(),
            LLMTextFrame("Hello there. How are you today?"),
            LLMFullResponseEndFrame(),
        ],
        pipeline_params=params(8000),
    )
    assert not of_type(up, ErrorFrame), [f.error for f in of_type(up, ErrorFrame)]
    assert [f.text for f in of_type(down, TTSTextFrame)] == ["Hello there.", "How are you today?"]
    assert all("word_timestamps" not in m for m in tts.sent_of("synthesize"))
    assert tts.received_of("timestamps") == []
    assert [m["word_timestamps"] for m in tts.received_of("started")] == [False]


async def test_token_mode_streams_tokens_verbatim(sidecar):
    tokens = ["Good", " morning", ",", " every", "one", ". It", " is", " sunny", "."]
    tts = RecordingChatterboxTTSService(
        url=sidecar.url, text_aggregation_mode=TextAggregationMode.TOKEN
    )
    down, up = await run_test(
        tts,
        frames_to_send=[
            LLMFullResponseStartFrame(),
            *[LLMTextFrame(t) for t in tokens],
            LLMFullResponseEndFrame(),
        ],
        pipeline_params=params(16000),
    )

    assert not of_type(up, ErrorFrame), [f.error for f in of_type(up, ErrorFrame)]
    synths = tts.sent_of("synthesize")
    assert [m["text"] for m in synths] == tokens
    assert len({m["context_id"] for m in synths}) == 1
    assert tts.sent[-1]["type"] == "flush"
    assert len(of_type(down, TTSStartedFrame)) == len(of_type(down, TTSStoppedFrame)) == 1
    # The sidecar times the words of the concatenated tokens: "every"+"one" is one word.
    timed = [w for m in tts.received_of("timestamps") for w in m["words"]]
    assert timed == "".join(tokens).split()
    assert " ".join(f.text for f in of_type(down, TTSTextFrame)) == "".join(tokens)
    assert_says(audio_of(down), 16000, "Good morning, everyone. It is sunny.")


async def test_metrics_ttfb_and_usage(sidecar):
    text = "Metrics are on."
    tts = ChatterboxTTSService(url=sidecar.url)
    down, _ = await run_test(
        tts,
        frames_to_send=[TTSSpeakFrame(text)],
        pipeline_params=params(24000, enable_metrics=True, enable_usage_metrics=True),
    )
    data = [d for f in of_type(down, MetricsFrame) for d in f.data]
    # Pipecat reports a zero TTFB for every processor at start; then one per context.
    ttfb = [d.value for d in data if isinstance(d, TTFBMetricsData) and d.value > 0]
    usage = [d.value for d in data if isinstance(d, TTSUsageMetricsData)]
    assert len(ttfb) == 1 and ttfb[0] < 5, ttfb
    assert usage == [len(text)]


LONG_REPLY = " ".join(
    [
        "Once upon a time there was a lighthouse keeper who lived alone on a rocky island.",
        "Every evening he climbed the long spiral stairs and lit the great lamp at the top.",
        "Ships far out at sea watched for its beam and steered safely past the reef.",
        "One winter a terrible storm blew in from the north and lasted for seven days.",
        "The waves crashed over the rocks and the wind howled through every window.",
        "Still the keeper climbed the stairs each night and kept the light burning bright.",
        "When the storm finally passed, a small boat arrived with fresh bread and letters.",
        "The sailors thanked him, for his light had guided them home through the dark.",
    ]
)


async def test_interruption_cancels_and_next_reply_plays(sidecar):
    # run_test sends its frames on a fixed schedule, but how soon the first audio comes
    # depends on the machine; this pipeline interrupts once the reply is audibly under way.
    tts = RecordingChatterboxTTSService(url=sidecar.url)
    live = LivePipeline(tts, params(16000))
    await live.start()
    await live.send(LLMFullResponseStartFrame())
    await live.send(LLMTextFrame(LONG_REPLY))
    await live.send(LLMFullResponseEndFrame())
    first_audio = await live.wait_for(lambda f: isinstance(f, TTSAudioRawFrame))
    old = first_audio.context_id
    await live.send(InterruptionFrame())
    await live.wait_for(lambda f: isinstance(f, InterruptionFrame))
    after = "After the interruption I speak again."
    await live.send(TTSSpeakFrame(after))
    new = (await live.wait_for(lambda f: isinstance(f, TTSStartedFrame))).context_id
    await live.wait_for(lambda f: isinstance(f, TTSStoppedFrame) and f.context_id == new)
    await live.end()
    down = live.down

    assert not of_type(live.up, ErrorFrame), [f.error for f in of_type(live.up, ErrorFrame)]
    assert old != new

    # The interrupted reply was still being generated: the sidecar got cancel and answered
    # cancelled, never done, for it.
    assert {"type": "cancel", "context_id": old} in tts.sent
    assert old in {m["context_id"] for m in tts.received_of("cancelled")}
    assert old not in {m["context_id"] for m in tts.received_of("done")}
    assert f"recv cancel context_id={old}" in sidecar.log_text()

    # Some of it played before the interruption, none after, and no stop frame for it.
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    assert audio_of(down[:cut], old).size > 0
    assert audio_of(down[cut:], old).size == 0
    # The next reply plays in full.
    assert [f.context_id for f in of_type(down[cut:], TTSStoppedFrame)] == [new]
    assert_says(audio_of(down, new), 16000, after)


async def test_settings_update_reaches_sidecar_and_voice_errors(sidecar, tmp_path):
    wav = tmp_path / "alice.wav"
    wav.write_bytes(reference_wav())
    await register_voice(sidecar.url, "plugin_alice", wav)

    Settings = ChatterboxTTSService.Settings
    tts = RecordingChatterboxTTSService(
        url=sidecar.url, settings=Settings(exaggeration=0.4, temperature=0.7)
    )
    down, up = await run_test(
        tts,
        frames_to_send=[
            TTSSpeakFrame("First."),
            SleepFrame(0.5),
            TTSUpdateSettingsFrame(delta=Settings(exaggeration=1.3, cfg_weight=0.2)),
            TTSSpeakFrame("Second."),
            SleepFrame(0.5),
            # A cloned voice: stored, but the piper engine cannot speak it.
            TTSUpdateSettingsFrame(delta=Settings(voice="plugin_alice")),
            TTSSpeakFrame("Third."),
            SleepFrame(0.5),
            TTSUpdateSettingsFrame(delta=Settings(voice="nobody_here")),
            TTSSpeakFrame("Fourth."),
            SleepFrame(0.5),
            TTSUpdateSettingsFrame(delta=Settings(voice="default")),
            TTSSpeakFrame("Fifth."),
            SleepFrame(0.5),
        ],
        pipeline_params=params(16000),
    )

    synths = tts.sent_of("synthesize")
    assert [m["text"] for m in synths] == ["First.", "Second.", "Third.", "Fourth.", "Fifth."]
    assert [m["voice_id"] for m in synths] == [
        "default",
        "default",
        "plugin_alice",
        "nobody_here",
        "default",
    ]

    # The sidecar's started echoes what it used for each context that played.
    echoes = {m["context_id"]: m for m in tts.received_of("started")}
    first, second, fifth = (echoes[synths[i]["context_id"]] for i in (0, 1, 4))
    assert (first["exaggeration"], first["cfg_weight"], first["temperature"]) == (0.4, 0.5, 0.7)
    assert (second["exaggeration"], second["cfg_weight"], second["temperature"]) == (1.3, 0.2, 0.7)
    assert (fifth["voice_id"], fifth["exaggeration"]) == ("default", 1.3)

    # The two bad voices come back as ErrorFrames carrying the sidecar's codes.
    sidecar_errors = [f for f in of_type(up, ErrorFrame) if isinstance(f.exception, SidecarError)]
    assert [(f.exception.code, f.exception.context_id) for f in sidecar_errors] == [
        ("unsupported", synths[2]["context_id"]),
        ("voice_not_found", synths[3]["context_id"]),
    ]
    # A bad voice fails its turn only: not a permanent error, the service stays usable.
    assert all(f.category is ErrorCategory.APPLICATION for f in sidecar_errors)
    assert "[voice_not_found]" in sidecar_errors[1].error

    # Every context started is stopped; the failed ones are not also silent-context errors.
    assert len(of_type(down, TTSStartedFrame)) == len(of_type(down, TTSStoppedFrame)) == 5
    assert len(of_type(up, ErrorFrame)) == 2, [f.error for f in of_type(up, ErrorFrame)]
    assert tts.is_usable
    assert audio_of(down, synths[4]["context_id"]).size > 0


async def test_register_voice_through_the_service_socket(sidecar, tmp_path):
    wav = tmp_path / "bob.wav"
    wav.write_bytes(reference_wav(5.0, 22050))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav file")
    tts = RecordingChatterboxTTSService(url=sidecar.url)
    results = {}
    connected = asyncio.Event()

    @tts.event_handler("on_connected")
    async def on_connected(_tts):
        connected.set()

    async def manage_voices():
        await asyncio.wait_for(connected.wait(), 10)
        results["registered"] = await tts.register_voice("plugin_bob", wav)
        with pytest.raises(SidecarError) as e:
            await tts.register_voice("plugin_bad", bad)
        results["bad"] = e.value
        results["listed"] = await tts.list_voices()
        results["deleted"] = await tts.delete_voice("plugin_bob")

    (_, up), _ = await asyncio.gather(
        run_test(tts, frames_to_send=[SleepFrame(1.5)], pipeline_params=params(16000)),
        manage_voices(),
    )

    # The requests went over the service's own connection, in order.
    assert [m["type"] for m in tts.sent] == [
        "register_voice",
        "register_voice",
        "list_voices",
        "delete_voice",
    ]
    assert results["registered"]["type"] == "voice_registered"
    assert results["registered"]["voice_id"] == "plugin_bob"
    assert results["bad"].code == "invalid_audio"
    assert "plugin_bob" in {v["voice_id"] for v in results["listed"]}
    assert results["deleted"]["type"] == "voice_deleted"
    assert "plugin_bob" not in {v["voice_id"] for v in await list_voices(sidecar.url)}
    # A failed voice request is the caller's error, not the pipeline's.
    assert not of_type(up, ErrorFrame)


async def test_voice_helpers_without_a_running_pipeline(sidecar, tmp_path):
    wav = tmp_path / "carol.wav"
    wav.write_bytes(reference_wav(3.5, 8000))
    # Not set up in a pipeline, so the service opens a connection of its own.
    tts = ChatterboxTTSService(url=sidecar.url)
    reply = await tts.register_voice("plugin_carol", wav)
    assert (reply["type"], reply["voice_id"]) == ("voice_registered", "plugin_carol")
    listed = {v["voice_id"]: v for v in await list_voices(sidecar.url)}
    assert listed["plugin_carol"]["usable"] is False  # piper cannot clone
    assert listed["default"]["usable"] is True
    with pytest.raises(SidecarError) as e:
        await register_voice(sidecar.url, "../escape", wav)
    assert e.value.code == "invalid_request"
    assert (await delete_voice(sidecar.url, "plugin_carol"))["type"] == "voice_deleted"
    with pytest.raises(SidecarError) as e:
        await tts.delete_voice("plugin_carol")
    assert e.value.code == "voice_not_found"
