"""The engine's S3Gen batcher on CPU: concurrent streams share S3Gen calls and keep their audio."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from chatterbox_sidecar.engines.base import SynthesisParams
from chatterbox_sidecar.engines.chatterbox import ChatterboxEngine
from chatterbox_sidecar.engines.chatterbox.t3.torch_backend import TorchT3Backend

from .test_engine import collect, engine_config, scripted_model_dir, segments  # noqa: F401

pytestmark = [pytest.mark.torch, pytest.mark.asyncio(loop_scope="module")]

TEXT = "Hi."  # 59 speech tokens: three chunks per stream (10, 25, 24)


async def test_concurrent_streams_share_s3gen_batches(scripted_model_dir):  # noqa: F811
    t3 = TorchT3Backend(scripted_model_dir, device="cpu", max_batch_size=4)
    eng = ChatterboxEngine(engine_config(scripted_model_dir, max_concurrency=4), t3_backend=t3)
    await eng.start()
    try:
        whole = await collect(
            eng.synthesize(segments(TEXT), SynthesisParams(streaming=False), None)
        )
        reference = np.concatenate(whole)
        streams = await asyncio.gather(
            *(collect(eng.synthesize(segments(TEXT), SynthesisParams(), None)) for _ in range(3))
        )
        batcher = eng._scheduler
        assert batcher.chunks >= 3 * 2  # every streamed chunk went through the batcher
        assert batcher.batches < batcher.chunks  # and some of them shared an S3Gen call
        for chunks in streams:
            audio = np.concatenate(chunks)
            assert len(audio) == len(reference) > 0
            rel = np.sqrt(np.mean((audio - reference) ** 2) / np.mean(reference**2))
            assert rel < 0.05  # equal away from the seams, as a stream decoded alone
    finally:
        await eng.close()
