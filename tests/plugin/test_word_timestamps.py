"""Word timestamps through a Pipecat pipeline: an interrupted turn keeps only the words heard.

``[ChatterboxTTSService, an output device, the assistant context aggregator]`` against a real
piper sidecar. The output device is a simulated speaker (no sound card here): it takes each
audio chunk in real time, as a device would, and Pipecat's own output transport releases each
word's ``TTSTextFrame`` when its timestamp comes up on the pipeline clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from chatterbox_sidecar.engines.piper import PiperEngine
from pipecat.frames.frames import (
    ErrorFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    OutputAudioRawFrame,
    StartFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.tests.utils import run_test
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams

from tests.engine_faults import inprocess_sidecar

from .helpers import LivePipeline, RecordingChatterboxTTSService, of_type

RATE = 16000
REPLY = (
    "Once upon a time there was a lighthouse keeper who lived alone on a rocky island. "
    "Every evening he climbed the long spiral stairs and lit the great lamp at the top. "
    "Ships far out at sea saw the light and steered away from the dangerous rocks below."
)
INTERRUPT_AFTER_S = 2.5
# Words starting this close to the cut may land either side of it: the interruption takes a
# moment to reach the output, and the clock releases words within a few ms.
MARGIN_S = 0.25


class Speaker(BaseOutputTransport):
    """A simulated audio device: plays each chunk in real time and counts what it played.

    ``reached`` is set once ``mark_s`` seconds have played.
    """

    def __init__(self, mark_s: float):
        super().__init__(TransportParams(audio_out_enabled=True))
        self.played_s = 0.0
        self.reached = asyncio.Event()
        self._mark_s = mark_s
        self._play_until = 0.0

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        now = time.monotonic()
        duration = len(frame.audio) / 2 / frame.sample_rate
        self._play_until = max(self._play_until, now) + duration
        await asyncio.sleep(self._play_until - now)
        self.played_s += duration
        if self.played_s >= self._mark_s:
            self.reached.set()
        return True


async def test_interrupted_turn_keeps_only_the_words_heard(sidecar):
    tts = RecordingChatterboxTTSService(url=sidecar.url)
    speaker = Speaker(INTERRUPT_AFTER_S)
    context = LLMContext()
    aggregators = LLMContextAggregatorPair(context)
    turns = []
    turn_stopped = asyncio.Event()

    @aggregators.assistant().event_handler("on_assistant_turn_stopped")
    async def on_turn_stopped(_aggregator, message):
        turns.append(message)
        turn_stopped.set()

    live = LivePipeline(
        Pipeline([tts, speaker, aggregators.assistant()]),
        PipelineParams(audio_out_sample_rate=RATE),
    )
    await live.start()
    await live.send(LLMFullResponseStartFrame())
    await live.send(LLMTextFrame(REPLY))
    await live.send(LLMFullResponseEndFrame())
    await asyncio.wait_for(speaker.reached.wait(), 60)
    played_s = speaker.played_s
    await live.send(InterruptionFrame())
    await asyncio.wait_for(turn_stopped.wait(), 10)
    await asyncio.sleep(0.3)
    await live.end()

    assert not of_type(live.up, ErrorFrame), [f.error for f in of_type(live.up, ErrorFrame)]
    # The sidecar timed every word it spoke before the cancel, in order.
    timed = [
        (word, start)
        for m in tts.received_of("timestamps")
        for word, start in zip(m["words"], m["start"], strict=True)
    ]
    words = REPLY.split()
    assert [w for w, _ in timed] == words[: len(timed)] and len(timed) > 10

    # The assistant's turn was interrupted and holds a prefix of the reply ...
    (turn,) = turns
    assert turn.interrupted
    kept = turn.content.split()
    assert kept == words[: len(kept)], kept
    assert 0 < len(kept) < len(words)
    assert context.get_messages()[-1] == {"role": "assistant", "content": turn.content}
    # ... exactly the words whose audio had started when the listener cut in.
    heard = [w for w, start in timed if start <= played_s - MARGIN_S]
    unheard = [w for w, start in timed if start > played_s + MARGIN_S]
    assert len(kept) >= len(heard), (kept, played_s, timed)
    assert len(kept) <= len(timed) - len(unheard), (kept, played_s, timed)


class UntimedPiperEngine(PiperEngine):
    """The real piper engine, announcing no word timestamps (as the chatterbox engine does)."""

    def __init__(self):
        super().__init__(max_concurrency=1)
        self.info = dataclasses.replace(self.info, word_timestamps=False)


async def test_a_sidecar_without_timings_still_gives_the_whole_text(tmp_path):
    text = "The engine times no words. Each sentence counts as heard when its audio starts."
    async with inprocess_sidecar(UntimedPiperEngine(), tmp_path) as (_app, port):
        tts = RecordingChatterboxTTSService(url=f"ws://127.0.0.1:{port}/v1/stream/tts")
        down, up = await run_test(
            tts,
            frames_to_send=[
                LLMFullResponseStartFrame(),
                LLMTextFrame(text),
                LLMFullResponseEndFrame(),
            ],
            pipeline_params=PipelineParams(audio_out_sample_rate=RATE),
        )
    assert not of_type(up, ErrorFrame), [f.error for f in of_type(up, ErrorFrame)]
    assert all(m["word_timestamps"] is True for m in tts.sent_of("synthesize"))
    assert [m["word_timestamps"] for m in tts.received_of("started")] == [False]
    assert tts.received_of("timestamps") == []
    assert [f.text for f in of_type(down, TTSTextFrame)] == text.split()
