"""ChatterboxTTSService when the sidecar fails: restarts, wrong keys, no sidecar, a hung one."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from chatterbox_sidecar.process import free_port
from pipecat.frames.frames import (
    ErrorFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.utils.errors import ErrorCategory
from pipecat_chatterbox import ChatterboxTTSService, SidecarError, list_voices

from tests.asr import transcribe, word_error_rate

from .helpers import LivePipeline, RecordingChatterboxTTSService, audio_of, of_type, stop_of
from .test_speech import LONG_REPLY


async def test_sidecar_restart_mid_reply_then_next_utterance_plays(sidecar_factory):
    begin = time.monotonic()
    sidecar = sidecar_factory()
    boot_s = time.monotonic() - begin
    # Backoff long enough that the base class's second reconnect attempt finds the new
    # sidecar up, short enough to keep the test quick.
    wait_s = boot_s + 1.0
    tts = RecordingChatterboxTTSService(
        url=sidecar.url, reconnect_backoff_min_wait=wait_s, reconnect_backoff_max_wait=wait_s
    )
    connects = []
    reconnected = asyncio.Event()

    @tts.event_handler("on_connected")
    async def on_connected(_tts):
        connects.append(time.monotonic())
        if len(connects) > 1:
            reconnected.set()

    live = LivePipeline(tts, PipelineParams(audio_out_sample_rate=16000))
    await live.start()
    await live.send(TTSSpeakFrame(LONG_REPLY))
    first = await live.wait_for(lambda f: isinstance(f, TTSAudioRawFrame))

    # The sidecar goes away mid-reply: the reply stops (no 3 s wait, no hang) ...
    await asyncio.to_thread(sidecar.stop)
    await live.wait_for(stop_of(first.context_id), timeout=5)
    # ... and when it is back, the service reconnects by itself.
    await asyncio.to_thread(sidecar.start)
    await asyncio.wait_for(reconnected.wait(), timeout=3 * wait_s + 5)

    after = "I am back and ready to help you again."
    await live.send(TTSSpeakFrame(after))
    started = await live.wait_for(
        lambda f: isinstance(f, TTSStartedFrame) and f.context_id != first.context_id
    )
    await live.wait_for(stop_of(started.context_id))
    await live.end()

    assert tts.is_usable
    # Errors while the sidecar was down were transient ones.
    errors = of_type(live.up, ErrorFrame)
    assert errors and not any(e.category.is_permanent for e in errors)
    assert len(of_type(live.down, TTSStartedFrame)) == len(of_type(live.down, TTSStoppedFrame))
    heard = transcribe(audio_of(live.down, started.context_id), 16000)
    assert word_error_rate(after, heard) <= 0.2, heard


async def test_wrong_api_key_is_a_permanent_error_and_nothing_hangs(sidecar_factory):
    sidecar = sidecar_factory(TTS_API_KEY="the-right-key")
    tts = ChatterboxTTSService(url=sidecar.url, api_key="a-wrong-key")
    start = time.monotonic()
    down, up = await asyncio.wait_for(
        run_test(
            tts,
            frames_to_send=[TTSSpeakFrame("Hello."), SleepFrame(0.2)],
            pipeline_params=PipelineParams(audio_out_sample_rate=16000),
        ),
        timeout=15,
    )
    elapsed = time.monotonic() - start

    auth = [f for f in of_type(up, ErrorFrame) if f.category is ErrorCategory.AUTHENTICATION]
    assert len(auth) == 1, [f.error for f in of_type(up, ErrorFrame)]
    assert "API key" in auth[0].error and "401" in auth[0].error
    assert isinstance(auth[0].exception, SidecarError) and auth[0].exception.code == "unauthorized"
    assert "a-wrong-key" not in auth[0].error
    assert not tts.is_usable
    assert not of_type(down, TTSAudioRawFrame)
    assert len(of_type(down, TTSStartedFrame)) == len(of_type(down, TTSStoppedFrame))
    assert elapsed < 3.0, f"run took {elapsed:.1f} s"

    # The voices helper says the same; the right key works.
    with pytest.raises(SidecarError) as e:
        await list_voices(sidecar.url, api_key="a-wrong-key")
    assert e.value.code == "unauthorized"
    tts = ChatterboxTTSService(url=sidecar.url, api_key="the-right-key")
    down, up = await run_test(
        tts,
        frames_to_send=[TTSSpeakFrame("Hello.")],
        pipeline_params=PipelineParams(audio_out_sample_rate=16000),
    )
    assert not of_type(up, ErrorFrame)
    assert audio_of(down).size > 0


async def test_no_sidecar_is_a_transient_error_and_nothing_hangs():
    url = f"ws://127.0.0.1:{free_port()}/v1/stream/tts"
    tts = ChatterboxTTSService(url=url)
    start = time.monotonic()
    down, up = await asyncio.wait_for(
        run_test(
            tts,
            frames_to_send=[TTSSpeakFrame("Is anyone there?")],
            pipeline_params=PipelineParams(audio_out_sample_rate=16000),
        ),
        timeout=15,
    )
    elapsed = time.monotonic() - start

    errors = of_type(up, ErrorFrame)
    assert errors and all(e.category is ErrorCategory.CONNECTIVITY for e in errors[:2])
    assert "cannot connect" in errors[0].error
    assert tts.is_usable  # the sidecar may come up later
    assert not of_type(down, TTSAudioRawFrame)
    assert len(of_type(down, TTSStartedFrame)) == len(of_type(down, TTSStoppedFrame)) == 1
    assert elapsed < 3.0, f"run took {elapsed:.1f} s"


async def test_end_frame_does_not_hang_on_a_frozen_sidecar(sidecar_factory):
    sidecar = sidecar_factory()
    tts = ChatterboxTTSService(url=sidecar.url)
    live = LivePipeline(tts, PipelineParams(audio_out_sample_rate=16000))
    await live.start()
    await live.send(TTSSpeakFrame(LONG_REPLY))
    first = await live.wait_for(lambda f: isinstance(f, TTSAudioRawFrame))
    os.kill(sidecar.proc.pid, signal.SIGSTOP)
    try:
        # No done ever comes and the close handshake gets no answer: the context times
        # out (3 s) and the close is bounded (2 s).
        elapsed = await live.end(timeout=20)
    finally:
        os.kill(sidecar.proc.pid, signal.SIGCONT)
    assert elapsed < 10, f"EndFrame took {elapsed:.1f} s"
    assert audio_of(live.down, first.context_id).size > 0
