"""Helpers for the plugin tests: a recording service and frame/audio accessors."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import soundfile as sf
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import QueuedFrameProcessor
from pipecat.workers.runner import WorkerRunner
from pipecat_chatterbox import ChatterboxTTSService


class RecordingChatterboxTTSService(ChatterboxTTSService):
    """The real service, also keeping every protocol message it sent and received."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []

    async def _send_json(self, message: dict[str, Any]):
        await super()._send_json(message)
        self.sent.append(message)

    async def _handle_message(self, msg: dict[str, Any]):
        self.received.append(msg)
        await super()._handle_message(msg)

    def sent_of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["type"] == kind]

    def received_of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m["type"] == kind]


def of_type(frames: Sequence[Frame], *types: type) -> list[Frame]:
    return [f for f in frames if isinstance(f, types)]


def audio_of(frames: Sequence[Frame], context_id: str | None = None) -> np.ndarray:
    """The int16 samples of the audio frames (of one context, if given), in order."""
    chunks = [
        f.audio
        for f in frames
        if isinstance(f, TTSAudioRawFrame) and (context_id is None or f.context_id == context_id)
    ]
    return np.frombuffer(b"".join(chunks), dtype="<i2")


def tts_sequence(frames: Sequence[Frame], types: Sequence[type]) -> list[str]:
    """Class names of the frames of the given types, consecutive duplicates collapsed."""
    names: list[str] = []
    for f in frames:
        if isinstance(f, tuple(types)):
            name = type(f).__name__
            if not names or names[-1] != name:
                names.append(name)
    return names


def reference_wav(seconds: float = 4.0, rate: int = 16000) -> bytes:
    """A valid mono WAV (a voiced-like tone with a little noise) for voice registration."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    signal = 0.3 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    signal += 0.01 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, signal.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


class LivePipeline:
    """A running ``[capture, processor, capture]`` pipeline that a test feeds step by step.

    ``run_test`` sends a fixed list of frames; the failure tests need to act (stop the
    sidecar, wait for a reconnect) between frames, so they use this instead. It is built
    from the same Pipecat parts as ``run_test``.
    """

    def __init__(self, processor: FrameProcessor, params: PipelineParams, **worker_kwargs: Any):
        self._down: asyncio.Queue[Frame] = asyncio.Queue()
        self._up: asyncio.Queue[Frame] = asyncio.Queue()
        pipeline = Pipeline(
            [
                QueuedFrameProcessor(queue=self._up, queue_direction=FrameDirection.UPSTREAM),
                processor,
                QueuedFrameProcessor(queue=self._down, queue_direction=FrameDirection.DOWNSTREAM),
            ]
        )
        self.worker = PipelineWorker(
            pipeline, params=params, cancel_on_idle_timeout=False, **worker_kwargs
        )
        self.down: list[Frame] = []
        self.up: list[Frame] = []
        self._task: asyncio.Task | None = None

    async def start(self, timeout: float = 10.0) -> None:
        started = asyncio.Event()

        @self.worker.event_handler("on_pipeline_started")
        async def on_started(_worker, _frame):
            started.set()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(self.worker)
        self._task = asyncio.create_task(runner.run())
        await asyncio.wait_for(started.wait(), timeout)

    async def send(self, frame: Frame) -> None:
        await self.worker.queue_frame(frame)

    async def wait_for(self, predicate: Callable[[Frame], bool], timeout: float = 30.0) -> Frame:
        """Collect downstream frames until one satisfies ``predicate``; return it."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self._down.get()
                self.down.append(frame)
                if predicate(frame):
                    return frame

    async def end(self, timeout: float = 30.0) -> float:
        """Send EndFrame and wait for the pipeline to finish; returns the seconds it took."""
        start = time.monotonic()
        await self.worker.queue_frame(EndFrame())
        assert self._task is not None
        await asyncio.wait_for(self._task, timeout)
        elapsed = time.monotonic() - start
        while not self._down.empty():
            self.down.append(self._down.get_nowait())
        while not self._up.empty():
            self.up.append(self._up.get_nowait())
        return elapsed


def stop_of(context_id: str) -> Callable[[Frame], bool]:
    """A predicate for the ``TTSStoppedFrame`` of one context."""
    return lambda f: isinstance(f, TTSStoppedFrame) and f.context_id == context_id


async def speak(live: LivePipeline, text: str, timeout: float = 60) -> str:
    """Send a ``TTSSpeakFrame`` and wait for its ``TTSStoppedFrame``; returns its context id.

    Each wait (for the new context's start, then for its stop) lasts at most ``timeout``.
    """
    known = {f.context_id for f in of_type(live.down, TTSStartedFrame)}
    await live.send(TTSSpeakFrame(text))
    started = await live.wait_for(
        lambda f: isinstance(f, TTSStartedFrame) and f.context_id not in known, timeout
    )
    await live.wait_for(stop_of(started.context_id), timeout)
    return started.context_id
