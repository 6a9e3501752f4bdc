"""The engine's S3Gen chunk batcher and its hold policy, with the real S3Gen decoder on the CPU."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from chatterbox_sidecar.engines.chatterbox.engine import _ChunkBatcher
from chatterbox_sidecar.engines.chatterbox.s3gen.stream import S3GenStreamDecoder

from .test_s3gen_batch import CONFIG, references, token_lists

pytestmark = pytest.mark.torch


class Recorder:
    """The real decoder; records the size of every S3Gen call and when it started."""

    def __init__(self, decoder: S3GenStreamDecoder):
        self.decoder = decoder
        self.calls: list[tuple[float, int]] = []
        self.loop_time = None

    def decode_chunk(self, stream, finalize):
        self.calls.append((self.loop_time(), 1))
        return self.decoder.decode_chunk(stream, finalize)

    def decode_chunks(self, streams, finals):
        self.calls.append((self.loop_time(), len(streams)))
        return self.decoder.decode_chunks(streams, finals)


@pytest.fixture(scope="module")
def decoder(s3gen_model) -> S3GenStreamDecoder:
    return S3GenStreamDecoder(s3gen_model, CONFIG)


async def run_batcher(decoder, hold: float, slacks: list[float], gap: float = 0.05):
    """Three streams ask for their first chunk ``gap`` seconds apart, with the given slacks."""
    loop = asyncio.get_running_loop()
    recorder = Recorder(decoder)
    recorder.loop_time = loop.time
    pool = ThreadPoolExecutor(1)

    async def run(fn, *args):
        return await loop.run_in_executor(pool, fn, *args)

    batcher = _ChunkBatcher(recorder, run, max_batch=8, hold_seconds=hold)
    streams = []
    for ref, toks in zip(REFS, token_lists(), strict=True):
        stream = decoder.new_stream(ref)
        stream.push(toks[:10])
        assert stream.ready(CONFIG)
        streams.append(stream)
    started = loop.time()

    async def ask(k: int) -> tuple[float, np.ndarray]:
        await asyncio.sleep(k * gap)
        audio = await batcher.decode(streams[k], False, slacks[k])
        return loop.time() - started, audio

    try:
        results = await asyncio.gather(*(ask(k) for k in range(3)))
    finally:
        await batcher.close()
        pool.shutdown()
    return recorder.calls, [t - started for t, _ in recorder.calls], results, batcher


REFS: list = []  # three voices, filled once per module by the fixture below


@pytest.fixture(scope="module", autouse=True)
def _refs(s3gen_model_dir):
    REFS[:] = references(s3gen_model_dir)


async def test_without_slack_nothing_waits(decoder):
    calls, starts, results, batcher = await run_batcher(decoder, hold=0.5, slacks=[0, 0, 0])
    # The first chunk starts at once, alone; the two that arrive while it decodes share a batch.
    assert [n for _, n in calls] == [1, 2]
    assert batcher.held == 0


async def test_chunks_with_slack_wait_for_company(decoder):
    calls, starts, results, batcher = await run_batcher(decoder, hold=0.5, slacks=[5, 5, 5])
    # All three share one call: the first waited for the others instead of going alone...
    assert [n for _, n in calls] == [3]
    assert batcher.held == 1
    # ...and not past its hold, 0.5 s after it arrived (timer lateness allowed for).
    assert 0.45 <= starts[0] <= 0.7
    # Held or not, each stream gets the same audio as when decoded alone.
    alone = []
    for ref, toks in zip(REFS, token_lists(), strict=True):
        stream = decoder.new_stream(ref)
        stream.push(toks[:10])
        alone.append(decoder.decode_chunk(stream, False))
    for (_, audio), want in zip(results, alone, strict=True):
        assert len(audio) == len(want)
        np.testing.assert_allclose(audio, want, atol=2e-3)


async def test_a_chunk_near_running_dry_goes_at_once_and_takes_the_waiting_ones(decoder):
    # The first two have plenty of slack, the third almost none (below the 0.3 s margin): the
    # batch starts when the third arrives and carries all three.
    calls, starts, _, batcher = await run_batcher(decoder, hold=2.0, slacks=[5, 5, 0.1], gap=0.1)
    assert [n for _, n in calls] == [3]
    assert 0.19 <= starts[0] < 0.6


async def test_a_lone_chunk_goes_when_its_hold_ends(decoder):
    calls, starts, _, _ = await run_batcher(decoder, hold=0.3, slacks=[5, 5, 5], gap=1.0)
    # Nobody came within 0.3 s: the first went alone after its hold, not sooner and not later.
    assert calls[0][1] == 1
    assert 0.29 <= starts[0] < 0.6
    # Slack shorter than hold + margin cuts the wait: 0.45 s of audio, 0.3 s margin -> 0.15 s.
    calls, starts, _, _ = await run_batcher(decoder, hold=1.0, slacks=[0.45, 5, 5], gap=1.0)
    assert calls[0][1] == 1
    assert 0.14 <= starts[0] < 0.45
