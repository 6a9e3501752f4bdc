"""The S3Gen scheduler: deadline order, lanes, batch mode, and the errors a batch hears of.

A fake decoder stands for S3Gen (the scheduler only calls ``decode_chunks`` and
``new_stream``); it records every batch and finishes it when the test says so.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from chatterbox_sidecar.engines.chatterbox.scheduler import ChunkScheduler

pytestmark = pytest.mark.asyncio


class FakeStream:
    def __init__(self, name: str, chunks_decoded: int = 1, pending: int = 0):
        self.name = name
        self.chunks_decoded = chunks_decoded
        self.pending = pending
        self.tokens: list[int] = []

    def push(self, tokens):
        self.tokens.extend(tokens)


class GatedDecoder:
    """Records each batch's stream names; a batch ends when ``release`` is called."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.hops: list[list[int | None]] = []
        self.gates: list[asyncio.Event] = []
        self.fail_next: Exception | None = None

    def new_stream(self, reference):
        return FakeStream(f"whole-{reference}", chunks_decoded=0)

    async def run(self, fn, *args):
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return fn(*args)

    def decode_chunks(self, streams, finalize, hops):
        self.batches.append([s.name for s in streams])
        self.hops.append(list(hops))
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        return [np.full(4, len(self.batches), dtype=np.float32) for _ in streams]

    async def release(self, batches: int = 1) -> None:
        """Let the next ``batches`` batches finish, one after the other."""
        for _ in range(batches):
            await settle()
            next(g for g in self.gates if not g.is_set()).set()
            await settle()


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_the_stream_that_runs_dry_first_goes_first():
    """While a batch runs, chunks queue up; the next batch takes them by deadline."""
    dec = GatedDecoder()
    sched = ChunkScheduler(dec, dec.run, max_batch=2, clock=lambda: 100.0)
    busy = asyncio.create_task(sched.decode(FakeStream("busy"), False, deadline=100.0))
    await settle()  # "busy" is being decoded; the worker is taken
    relaxed = asyncio.create_task(sched.decode(FakeStream("relaxed"), False, deadline=105.0))
    starving = asyncio.create_task(sched.decode(FakeStream("starving"), False, deadline=100.1))
    soon = asyncio.create_task(sched.decode(FakeStream("soon"), False, deadline=101.0))
    await settle()
    assert [j.stream.name for j in sched.order()] == ["starving", "soon", "relaxed"]
    await dec.release(3)
    await asyncio.gather(busy, relaxed, starving, soon)
    # arrival order was relaxed, starving, soon: served by deadline, two a batch
    assert dec.batches == [["busy"], ["starving", "soon"], ["relaxed"]]
    assert sched.batches == 3 and sched.chunks == 4


async def test_first_chunks_take_the_fast_lane_and_do_not_wait_for_the_bulk_batch():
    bulk, fast = GatedDecoder(), GatedDecoder()
    sched = ChunkScheduler(bulk, bulk.run, fast=fast, run_fast=fast.run, clock=lambda: 0.0)
    steady = asyncio.create_task(sched.decode(FakeStream("steady"), False, deadline=3.0))
    await settle()
    first = asyncio.create_task(sched.decode(FakeStream("new", chunks_decoded=0), False, 0.0))
    await settle()
    # the fast lane started its batch while the bulk batch still runs
    assert len(fast.gates) == 1 and not bulk.gates[0].is_set()
    await fast.release()
    await first
    assert fast.batches == [["new"]] and bulk.batches == []
    assert not steady.done()
    await bulk.release()
    await steady
    assert set(sched.lanes) == {"bulk", "fast"}


async def test_batch_mode_waits_behind_streamed_chunks_until_overdue():
    now = [0.0]
    dec = GatedDecoder()
    sched = ChunkScheduler(dec, dec.run, max_batch=8, whole_max_wait=1.0, clock=lambda: now[0])
    busy = asyncio.create_task(sched.decode(FakeStream("busy"), False, deadline=0.0))
    await settle()
    whole = asyncio.create_task(sched.decode_whole("ref", [1, 2, 3]))
    streamed = asyncio.create_task(sched.decode(FakeStream("streamed"), False, deadline=2.0))
    await settle()
    await dec.release()  # "busy" ends; "streamed" goes next, alone (no mixing with whole)
    later = asyncio.create_task(sched.decode(FakeStream("later"), False, deadline=2.5))
    now[0] = 1.5  # the whole utterance has now waited longer than whole_max_wait
    await dec.release()
    await dec.release()
    await dec.release()
    await asyncio.gather(busy, whole, streamed, later)
    assert dec.batches == [["busy"], ["streamed"], ["whole-ref"], ["later"]]
    assert dec.hops[2] == [None]  # decoded whole, as a final chunk


async def test_a_failing_batch_fails_its_chunks_and_the_lane_goes_on():
    dec = GatedDecoder()
    sched = ChunkScheduler(dec, dec.run, max_batch=4, clock=lambda: 0.0)
    dec.fail_next = RuntimeError("boom")
    bad = asyncio.create_task(sched.decode(FakeStream("a"), False, 0.0, hop=25))
    await dec.release()
    with pytest.raises(RuntimeError, match="boom"):
        await bad
    good = asyncio.create_task(sched.decode(FakeStream("b"), True, 0.0))
    await dec.release()
    assert len(await good) == 4
    assert dec.hops == [[25], [None]]
    await sched.close()


async def test_lead_time_follows_the_batches():
    dec = GatedDecoder()
    clock = [0.0]
    sched = ChunkScheduler(dec, dec.run, clock=lambda: clock[0])
    assert sched.lead_time() == 0.0
    task = asyncio.create_task(sched.decode(FakeStream("a"), False, 0.0))
    await settle()
    clock[0] = 0.4
    await dec.release()
    await task
    assert sched.lead_time() == pytest.approx(0.4)  # idle: one batch of its own


async def test_a_small_chunk_about_to_run_dry_skips_the_bulk_queue():
    """Urgent (deadline before the bulk lane's turnaround) and small: fast lane; else bulk."""
    bulk, fast = GatedDecoder(), GatedDecoder()
    clock = [0.0]
    sched = ChunkScheduler(
        bulk, bulk.run, fast=fast, run_fast=fast.run, fast_max_tokens=28, clock=lambda: clock[0]
    )
    warm = asyncio.create_task(sched.decode(FakeStream("warm"), False, deadline=9.0, hop=100))
    await settle()
    clock[0] = 0.5
    await bulk.release()
    await warm  # the bulk lane's batches take 0.5 s now
    long = asyncio.create_task(sched.decode(FakeStream("long"), False, deadline=9.0, hop=100))
    await settle()  # a bulk batch runs again: a new chunk would wait ~1 s in that lane
    assert sched.lead_time() == pytest.approx(1.0)
    dry = asyncio.create_task(sched.decode(FakeStream("dry"), False, deadline=0.8, hop=25))
    big = asyncio.create_task(sched.decode(FakeStream("big"), False, deadline=0.8, hop=50))
    calm = asyncio.create_task(sched.decode(FakeStream("calm"), False, deadline=5.0, hop=25))
    tail = asyncio.create_task(sched.decode(FakeStream("tail", pending=9), True, deadline=0.7))
    await settle()
    await fast.release()
    await asyncio.gather(dry, tail)
    assert fast.batches == [["tail", "dry"]]  # by deadline
    await bulk.release(2)
    await asyncio.gather(long, big, calm)
    assert bulk.batches[1:] == [["long"], ["big", "calm"]]
