"""ChatterboxTTSService over a whole call: idle stretches and a mistyped voice.

A call is long-lived: the service must not lose its connection while nobody speaks, and one
bad turn must not end the call.
"""

from __future__ import annotations

import asyncio

from pipecat.frames.frames import (
    ErrorFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.pipeline.worker import PipelineParams, ProcessorUnusablePolicy
from pipecat_chatterbox import ChatterboxTTSService, SidecarError

from tests.asr import transcribe, word_error_rate

from .helpers import LivePipeline, RecordingChatterboxTTSService, audio_of, of_type, speak

# The shortest idle timeout the sidecar accepts is 1 s.
IDLE_SECONDS = 1.5


async def test_idle_past_the_sidecar_timeout_then_next_turn_speaks_without_reconnect(
    sidecar_factory,
):
    # Needs a sidecar that accepts {"type": "keepalive"} silently and counts it as activity.
    sidecar = sidecar_factory(TTS_IDLE_SECONDS=str(IDLE_SECONDS))
    tts = RecordingChatterboxTTSService(url=sidecar.url)
    connects = 0

    @tts.event_handler("on_connected")
    async def on_connected(_tts):
        nonlocal connects
        connects += 1

    live = LivePipeline(tts, PipelineParams(audio_out_sample_rate=16000))
    await live.start()
    await speak(live, "Hello.", timeout=30)
    # Nobody speaks for three idle timeouts.
    await asyncio.sleep(3 * IDLE_SECONDS)
    after = "Are you still there? The answer comes now."
    context_id = await speak(live, after, timeout=30)
    await live.end()

    assert tts.server_info["limits"]["idle_timeout_seconds"] == IDLE_SECONDS
    # A keepalive every third of the idle timeout, answered by nothing.
    assert len(tts.sent_of("keepalive")) >= 6
    assert not tts.received_of("error"), tts.received_of("error")
    assert connects == 1
    assert "idle timeout" not in sidecar.log_text()
    assert not of_type(live.up, ErrorFrame), [f.error for f in of_type(live.up, ErrorFrame)]
    heard = transcribe(audio_of(live.down, context_id), 16000)
    assert word_error_rate(after, heard) <= 0.2, heard


async def test_mistyped_voice_fails_its_turns_only_and_a_good_voice_speaks(sidecar):
    # The strictest policy: a service written off would cancel the whole pipeline.
    tts = RecordingChatterboxTTSService(
        url=sidecar.url, settings=ChatterboxTTSService.Settings(voice="defualt")
    )
    usable_changes: list[bool] = []

    @tts.event_handler("on_usable_changed")
    async def on_usable_changed(_tts, is_usable):
        usable_changes.append(is_usable)

    live = LivePipeline(
        tts,
        PipelineParams(audio_out_sample_rate=16000),
        processor_unusable_policy=ProcessorUnusablePolicy.CANCEL,
    )
    await live.start()
    # More bad turns than Pipecat's limit of silent contexts in a row (3).
    bad = [await speak(live, f"Attempt number {n}.", timeout=30) for n in range(4)]
    await live.send(TTSUpdateSettingsFrame(delta=ChatterboxTTSService.Settings(voice="default")))
    good_text = "Thank you for calling. How can I help you today?"
    good = await speak(live, good_text, timeout=30)
    await live.end()

    errors = of_type(live.up, ErrorFrame)
    assert [(e.exception.code, e.exception.context_id) for e in errors] == [
        ("voice_not_found", context_id) for context_id in bad
    ], [e.error for e in errors]
    assert all(isinstance(e.exception, SidecarError) for e in errors)
    assert not any(e.category.is_permanent for e in errors)
    assert "defualt" in errors[0].error
    assert usable_changes == [] and tts.is_usable
    assert all(audio_of(live.down, c).size == 0 for c in bad)
    heard = transcribe(audio_of(live.down, good), 16000)
    assert word_error_rate(good_text, heard) <= 0.2, heard
