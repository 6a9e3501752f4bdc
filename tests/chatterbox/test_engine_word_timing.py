"""Word timestamps of the chatterbox engine on CPU: alignment rows in, span timings out.

The T3 backend here is the real torch backend (scripted checkpoint: a known token count per
text) with alignment rows of a known path laid over its tokens: text position ``t // HOLD`` at
speech token ``t``. So when every word starts is known, and the engine must time each word of
each segment once, in order, at that time, with the chunk whose audio holds its start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from chatterbox_sidecar.engines.base import AlignedAudio, SynthesisParams
from chatterbox_sidecar.engines.chatterbox import ChatterboxEngine
from chatterbox_sidecar.engines.chatterbox.s3gen.stream import SAMPLE_RATE, SAMPLES_PER_TOKEN
from chatterbox_sidecar.engines.chatterbox.t3.alignment import (
    SPEECH_TOKEN_SECONDS,
    text_token_words,
)
from chatterbox_sidecar.engines.chatterbox.t3.backend import T3Backend, T3Request
from chatterbox_sidecar.engines.chatterbox.t3.stream import TokenStream
from chatterbox_sidecar.engines.chatterbox.t3.torch_backend import TorchT3Backend
from chatterbox_sidecar.engines.chatterbox.word_timing import PieceTimer, piece_offsets

from .test_engine import engine_config, expected_tokens, scripted_model_dir, segments  # noqa: F401

pytestmark = pytest.mark.torch
in_module_loop = pytest.mark.asyncio(loop_scope="module")

HOLD = 2  # speech tokens per text token on the scripted path
TEXTS = ["Hi there you.", "It costs five dollars, friend."]


class PathT3(T3Backend):
    """The torch backend's tokens, with one-hot alignment rows on the path ``t // HOLD``."""

    word_alignment = True

    def __init__(self, inner: TorchT3Backend):
        self.inner = inner
        self.asked: list[bool] = []

    async def start(self) -> None:
        await self.inner.start()

    def generate(self, request: T3Request) -> TokenStream:
        self.asked.append(request.alignment)
        strings = self.inner.decoder.text_tokens(request.text) if request.alignment else None
        task: asyncio.Task | None = None
        out = TokenStream(lambda: task is not None and task.cancel(), strings)
        task = asyncio.create_task(self._feed(request, out, len(strings or ())))
        return out

    async def _feed(self, request: T3Request, out: TokenStream, n_text: int) -> None:
        inner = self.inner.generate(dataclasses.replace(request, alignment=False))
        step = 0
        try:
            async for delta in inner:
                rows = None
                if n_text:
                    rows = []
                    for t in range(step, step + len(delta)):
                        row = np.zeros((3, n_text), dtype=np.float32)
                        row[:, min(t // HOLD, n_text - 1)] = 0.7
                        rows.append(row)
                out.push(delta, rows)
                step += len(delta)
            out.finish()
        finally:
            await inner.aclose()

    async def close(self) -> None:
        await self.inner.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(scripted_model_dir: Path) -> AsyncIterator[ChatterboxEngine]:  # noqa: F811
    t3 = PathT3(TorchT3Backend(scripted_model_dir, device="cpu", max_batch_size=2))
    eng = ChatterboxEngine(engine_config(scripted_model_dir), t3_backend=t3)
    await eng.start()
    yield eng
    await eng.close()


def expected_starts(
    engine: ChatterboxEngine, texts: list[str]
) -> list[tuple[int, int, int, float]]:
    """(segment, start_char, end_char, start seconds on the context's clock) of every word the
    path reaches before its piece's tokens run out."""
    out = []
    offset = 0.0
    for number, text in enumerate(texts):
        strings = engine._t3.inner.decoder.text_tokens(text)
        owners = text_token_words(strings, text)
        tokens = expected_tokens(text)
        for word, m in enumerate(re.finditer(r"\S+", text)):
            first = owners.index(word)  # the word's first text token
            if first * HOLD < tokens:
                out.append(
                    (number, m.start(), m.end(), offset + first * HOLD * SPEECH_TOKEN_SECONDS)
                )
        offset += tokens * SPEECH_TOKEN_SECONDS
    return out


async def timed_chunks(engine, params) -> list[tuple[float, float, AlignedAudio]]:
    """Each chunk with its first sample and end, in seconds on the context's clock."""
    out, at = [], 0
    async for chunk in engine.synthesize(segments(*TEXTS), params, None):
        assert isinstance(chunk, AlignedAudio)
        out.append((at / SAMPLE_RATE, (at + len(chunk.audio)) / SAMPLE_RATE, chunk))
        at += len(chunk.audio)
    return out


@in_module_loop
async def test_info_says_word_timestamps(engine):
    assert engine.info.word_timestamps is True
    assert "attention" in engine.info.alignment_source


@in_module_loop
@pytest.mark.parametrize("streaming", [True, False])
async def test_each_word_timed_once_at_its_start_with_its_chunk(engine, streaming):
    params = SynthesisParams(word_timestamps=True, streaming=streaming)
    chunks = await timed_chunks(engine, params)
    total = sum(expected_tokens(t) for t in TEXTS) * SAMPLES_PER_TOKEN
    assert sum(len(c.audio) for _, _, c in chunks) == total
    got = []
    for start, end, chunk in chunks:
        for span in chunk.spans:
            at = start + span.start
            # With its chunk or earlier: never before the chunk's first sample, and (but for
            # a piece's last words) not past its end either, as the path is never revised here.
            assert span.start >= 0 and span.end >= span.start
            assert at < end + 1e-9 or not streaming or chunk is chunks[-1][2], (span, start, end)
            got.append((span.segment, span.start_char, span.end_char, round(at, 6)))
    want = [(s, a, b, round(t, 6)) for s, a, b, t in expected_starts(engine, TEXTS)]
    assert len(want) >= 8  # the path reaches most words
    assert got == want
    if streaming:
        assert sum(1 for _, _, c in chunks if c.spans) >= 3  # spread over several chunks


@in_module_loop
async def test_no_alignment_unless_asked(engine):
    engine._t3.asked.clear()
    chunks = [c async for c in engine.synthesize(segments(*TEXTS), SynthesisParams(), None)]
    assert all(isinstance(c, np.ndarray) for c in chunks)
    assert engine._t3.asked == [False, False]


def test_piece_offsets_and_a_timer_without_rows():
    segment = "One two three. Four five."
    assert piece_offsets(segment, ["One two three.", "Four five."]) == [0, 15]
    assert piece_offsets(segment, ["One two three.", "Changed."]) == [0, None]
    timer = PieceTimer(0, 0, "One two.")
    timer.begin(None)  # a backend that sends no rows: no timings, no error
    timer.add([np.ones((3, 4))])
    assert timer.take(0.0, None) == () and timer.steps == 0


def test_timer_sends_words_once_and_clamps_late_ones():
    text = "Aa bb cc"
    tokens = ["[START]", "Aa", "[SPACE]", "bb", "[SPACE]", "cc", ".", "[STOP]"]
    timer = PieceTimer(3, 10, text)
    timer.begin(tokens)

    def rows(positions):
        out = []
        for p in positions:
            row = np.full((3, len(tokens)), 0.01, dtype=np.float32)
            row[:, p] = 0.9
            out.append(row)
        return out

    timer.add(rows([0, 1, 1, 1, 2, 3, 3]))  # "bb" starts at token 5 (0.2 s)
    first = timer.take(0.0, 0.12)  # a chunk of tokens 0-2: "Aa" (0.04 s) only
    assert [(s.segment, s.start_char, s.end_char) for s in first] == [(3, 10, 12)]
    assert first[0].start == pytest.approx(0.04)
    second = timer.take(0.12, 0.4)  # tokens 3-9: "bb" at 0.2 s, 0.08 s into the chunk
    assert [(s.start_char, s.start) for s in second] == [(13, pytest.approx(0.08))]
    timer.add(rows([3, 5, 5, 6, 7]))  # "cc" starts at token 8 (0.32 s), inside sent audio
    late = timer.take(0.4, 0.6)
    assert [(s.start_char, s.start) for s in late] == [(16, 0.0)]  # moved up to this chunk
    assert timer.take(0.6, None) == ()  # each word once
