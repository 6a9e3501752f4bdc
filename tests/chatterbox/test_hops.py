"""Growing hops: the chunk schedule, and the smaller hop a stream takes when about to run dry."""

from __future__ import annotations

import pytest
from chatterbox_sidecar.engines.chatterbox.s3gen.stream import (
    LOOKAHEAD_TOKENS,
    StreamConfig,
    StreamState,
)

pytestmark = pytest.mark.torch

CONFIG = StreamConfig(chunk_size=25, first_chunk_size=7, context_window=50, max_chunk_size=100)


def test_hops_grow_from_the_first_chunk_to_the_largest():
    assert [CONFIG.hop_cap(k) for k in range(6)] == [7, 25, 50, 100, 100, 100]
    assert CONFIG.hops() == (7, 25, 50, 100)
    fixed = StreamConfig(chunk_size=25, first_chunk_size=10, max_chunk_size=25)
    assert [fixed.hop_cap(k) for k in range(4)] == [10, 25, 25, 25]
    assert fixed.hops() == (10, 25)
    # a largest hop below the chunk size means fixed hops of chunk_size
    assert StreamConfig(chunk_size=30, max_chunk_size=12).hops() == (10, 30)


def stream_with(pending: int, chunks_decoded: int) -> StreamState:
    stream = StreamState(reference=None)  # the hop choice never touches the voice
    stream.push(range(100, 100 + 200 + pending))
    stream.played_tokens = 200
    stream.chunks_decoded = chunks_decoded
    return stream


@pytest.mark.parametrize(
    ("pending", "chunks", "urgent", "expected"),
    [
        (7 + LOOKAHEAD_TOKENS, 0, False, 7),  # the first hop is there
        (6 + LOOKAHEAD_TOKENS, 0, False, None),
        (49 + LOOKAHEAD_TOKENS, 2, False, None),  # third chunk waits for its 50 tokens
        (50 + LOOKAHEAD_TOKENS, 2, False, 50),
        (80 + LOOKAHEAD_TOKENS, 2, False, 50),  # never more than this chunk's cap
        (49 + LOOKAHEAD_TOKENS, 2, True, 25),  # about to run dry: the largest hop that fits
        (30 + LOOKAHEAD_TOKENS, 3, True, 25),
        (9 + LOOKAHEAD_TOKENS, 3, True, 7),
        (6 + LOOKAHEAD_TOKENS, 3, True, None),  # not even the smallest hop
    ],
)
def test_hop_choice(pending, chunks, urgent, expected):
    assert stream_with(pending, chunks).hop(CONFIG, urgent=urgent) == expected
    assert stream_with(pending, chunks).ready(CONFIG) == (
        stream_with(pending, chunks).hop(CONFIG) is not None
    )
