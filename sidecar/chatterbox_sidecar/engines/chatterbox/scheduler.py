"""Deadline scheduling of S3Gen work: the stream whose listener runs dry first is served first.

Streams ask for chunks with :meth:`ChunkScheduler.decode`, giving the loop time at which their
listener runs out of audio (``deadline``; a first chunk's deadline is when its request came,
so a stream with nothing to play goes ahead of streams with audio in hand). Two lanes, each
with its own S3Gen decoder (its own CUDA graphs, memory pool and CUDA stream), run batches
(rows = streams):

- the **fast lane** takes first chunks, and small chunks (at most ``fast_max_tokens`` new
  tokens) whose deadline comes before the bulk lane could serve them: small, quick batches, so
  that neither time to first audio nor a stream about to run dry waits behind a long batch of
  steady chunks (on CUDA its stream has high priority, and the GPU interleaves both lanes'
  kernels);
- the **bulk lane** takes every other chunk, earliest deadline first, up to ``max_batch`` a
  batch; whole utterances of batch mode (:meth:`decode_whole`, no listener waiting) ride in it
  when no streamed chunk waits, or when they have waited ``whole_max_wait`` seconds.

The scheduler also keeps the figures a stream needs to decide when to ask (:meth:`lead_time`):
how long a chunk asked for now takes to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class ChunkDecoder(Protocol):
    """What the scheduler needs of an S3Gen decoder (``S3GenStreamDecoder``)."""

    def decode_chunks(
        self, streams: Sequence[Any], finalize: Sequence[bool], hops: Sequence[int | None]
    ) -> list[np.ndarray]: ...

    def new_stream(self, reference: Any) -> Any: ...


@dataclass
class ChunkJob:
    """One chunk waiting for a batch.

    Parameters:
        stream: The stream (``StreamState``).
        finalize: Whether its utterance is complete.
        hop: New tokens of a non-final chunk (None: the decoder's choice, or final).
        deadline: Loop time at which its listener runs dry (smaller: served sooner).
        future: Resolved with the audio.
        first: Whether it is the stream's first chunk (fast lane).
        whole: A batch-mode utterance (no listener waiting; bulk lane when idle).
        enqueued: Loop time it was asked for.
    """

    stream: Any
    finalize: bool
    hop: int | None
    deadline: float
    future: asyncio.Future
    first: bool = False
    whole: bool = False
    enqueued: float = 0.0


@dataclass
class LaneStats:
    """Counters of one lane, read by benchmarks and logs."""

    batches: int = 0
    chunks: int = 0
    busy_seconds: float = 0.0
    late_chunks: int = 0  # chunks whose batch started after their deadline
    batch_seconds_ema: float = 0.0
    sizes: list[int] = field(default_factory=list)


class _Lane:
    """One decoder, one worker thread, one queue ordered by deadline."""

    def __init__(
        self,
        name: str,
        decoder: ChunkDecoder,
        run: Callable[..., Any],
        max_batch: int,
        clock: Callable[[], float],
    ):
        self.name = name
        self.decoder = decoder
        self.run = run
        self.max_batch = max(1, max_batch)
        self.clock = clock
        self.waiting: list[ChunkJob] = []
        self.task: asyncio.Task | None = None
        self.running_since: float | None = None
        self.stats = LaneStats()

    def remaining(self) -> float:
        """Expected seconds until the batch in progress ends (0 when idle)."""
        if self.running_since is None:
            return 0.0
        elapsed = self.clock() - self.running_since
        return max(0.0, self.stats.batch_seconds_ema - elapsed)


class ChunkScheduler:
    """Serves S3Gen chunk requests by deadline across a fast and a bulk lane.

    Args:
        bulk: Decoder of the bulk lane.
        run_bulk: Runs a function in the bulk lane's worker thread (awaitable).
        fast: Decoder of the fast lane (None: first chunks use the bulk lane too).
        run_fast: Runs a function in the fast lane's worker thread.
        max_batch: Most chunks in one bulk batch.
        fast_max_batch: Most first chunks in one fast batch.
        whole_max_wait: Seconds a batch-mode utterance waits behind streamed chunks at most.
        fast_max_tokens: Largest chunk (new tokens) an urgent stream may take to the fast lane.
        clock: Loop clock (tests pass their own).
    """

    def __init__(
        self,
        bulk: ChunkDecoder,
        run_bulk: Callable[..., Any],
        *,
        fast: ChunkDecoder | None = None,
        run_fast: Callable[..., Any] | None = None,
        max_batch: int = 64,
        fast_max_batch: int = 16,
        whole_max_wait: float = 1.0,
        fast_max_tokens: int = 28,
        clock: Callable[[], float] | None = None,
    ):
        self._clock = clock
        self._bulk = _Lane("bulk", bulk, run_bulk, max_batch, self.now)
        self._fast = (
            _Lane("fast", fast, run_fast or run_bulk, fast_max_batch, self.now)
            if fast is not None
            else None
        )
        self._whole_max_wait = whole_max_wait
        self._fast_max_tokens = fast_max_tokens

    # ---- public ------------------------------------------------------------------------

    def now(self) -> float:
        """Returns: the loop's clock (or the test's)."""
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    @property
    def lanes(self) -> dict[str, LaneStats]:
        """Counters per lane."""
        lanes = {"bulk": self._bulk.stats}
        if self._fast is not None:
            lanes["fast"] = self._fast.stats
        return lanes

    @property
    def batches(self) -> int:
        """S3Gen calls made so far (both lanes)."""
        return sum(s.batches for s in self.lanes.values())

    @property
    def chunks(self) -> int:
        """Chunks decoded so far (both lanes)."""
        return sum(s.chunks for s in self.lanes.values())

    def lead_time(self, first: bool = False) -> float:
        """Seconds a chunk asked for now is expected to take to come back.

        The batch in progress in its lane, then one batch of its own (both from the lane's
        moving average of batch times).
        """
        lane = self._fast if first and self._fast is not None else self._bulk
        return lane.remaining() + lane.stats.batch_seconds_ema

    async def decode(
        self,
        stream: Any,
        finalize: bool,
        deadline: float,
        hop: int | None = None,
    ) -> np.ndarray:
        """Decode ``stream``'s next chunk in the next batch of its lane.

        Args:
            stream: The stream.
            finalize: Whether its utterance is complete.
            deadline: Loop time at which its listener runs dry (for a first chunk: when its
                request came).
            hop: New tokens of a non-final chunk (None: the decoder's choice).

        Returns:
            The new audio (float32, 24 kHz).
        """
        first = getattr(stream, "chunks_decoded", 1) == 0
        lane = self._bulk
        if self._fast is not None:
            tokens = getattr(stream, "pending", 0) if finalize or hop is None else hop
            urgent = deadline - self.now() < self.lead_time()
            if first or (urgent and tokens <= self._fast_max_tokens):
                lane = self._fast
        return await self._submit(lane, ChunkJob(stream, finalize, hop, deadline, None, first))

    async def decode_whole(self, reference: Any, tokens: Iterable[int]) -> np.ndarray:
        """Decode a whole utterance (batch mode) in the bulk lane, batched with others.

        Args:
            reference: The voice.
            tokens: All of its speech tokens.

        Returns:
            Its audio (float32, 24 kHz).
        """
        stream = self._bulk.decoder.new_stream(reference)
        stream.push(tokens)
        job = ChunkJob(stream, True, None, float("inf"), None, whole=True)
        return await self._submit(self._bulk, job)

    def order(self, lane: str = "bulk") -> list[ChunkJob]:
        """The jobs waiting in a lane, in the order they will be served."""
        target = self._fast if lane == "fast" and self._fast is not None else self._bulk
        return self._pick(target, len(target.waiting) or 1, take=False)

    async def close(self) -> None:
        """Stop the lanes; waiting requests are cancelled."""
        for lane in (self._bulk, self._fast):
            if lane is None:
                continue
            task, lane.task = lane.task, None
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for job in lane.waiting:
                job.future.cancel()
            lane.waiting.clear()

    # ---- internals ---------------------------------------------------------------------

    async def _submit(self, lane: _Lane, job: ChunkJob) -> np.ndarray:
        job.future = asyncio.get_running_loop().create_future()
        job.enqueued = self.now()
        lane.waiting.append(job)
        if lane.task is None or lane.task.done():
            lane.task = asyncio.create_task(self._drain(lane), name=f"s3gen-{lane.name}")
        return await job.future

    def _pick(self, lane: _Lane, limit: int, take: bool = True) -> list[ChunkJob]:
        """The next batch: streamed chunks by deadline; batch-mode ones when due or idle."""
        live = [j for j in lane.waiting if not j.future.done()]
        streamed = sorted((j for j in live if not j.whole), key=lambda j: j.deadline)
        whole = sorted((j for j in live if j.whole), key=lambda j: j.enqueued)
        now = self.now()
        overdue = [j for j in whole if now - j.enqueued >= self._whole_max_wait]
        if overdue or not streamed:
            # Batch mode alone in a batch: its long rows would slow streamed chunks down.
            batch = whole[:limit]
        else:
            batch = streamed[:limit]
        if take:
            chosen = {id(j) for j in batch}
            lane.waiting = [j for j in live if id(j) not in chosen]
        return batch

    async def _drain(self, lane: _Lane) -> None:
        stats = lane.stats
        while lane.waiting:
            batch = self._pick(lane, lane.max_batch)
            if not batch:
                continue
            started = self.now()
            stats.late_chunks += sum(j.deadline < started for j in batch)
            lane.running_since = started
            try:
                audios = await lane.run(
                    lane.decoder.decode_chunks,
                    [j.stream for j in batch],
                    [j.finalize for j in batch],
                    [j.hop for j in batch],
                )
            except asyncio.CancelledError:
                for j in batch:
                    j.future.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - every stream of the batch hears of it
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            finally:
                lane.running_since = None
            took = self.now() - started
            stats.batches += 1
            stats.chunks += len(batch)
            stats.busy_seconds += took
            stats.sizes.append(len(batch))
            if len(stats.sizes) > 4096:
                del stats.sizes[:2048]
            if not any(j.whole for j in batch):
                ema = stats.batch_seconds_ema
                stats.batch_seconds_ema = took if ema == 0 else 0.8 * ema + 0.2 * took
            for j, audio in zip(batch, audios, strict=True):
                if not j.future.done():
                    j.future.set_result(audio)


__all__ = ["ChunkJob", "ChunkScheduler", "LaneStats"]
