"""Word timings of the chatterbox engine: T3's attention alignment, handed out chunk by chunk.

For each T3 piece that asked for timestamps, a :class:`PieceTimer` feeds the alignment rows the
T3 backend streams with the speech tokens (one per token) to an
:class:`~.t3.alignment.AttentionAligner`, and turns the path into :class:`SpanTiming` entries
over the piece's words (whitespace-separated runs of the normalised segment). The session maps
those character spans back to the client's words (``chatterbox_sidecar.words``).

When a word goes out, and what that costs: a word counts as begun once the alignment path has
reached it, and its timing goes out with the first audio chunk that holds its start (the
chunk's sample range covers the word's first speech token, 40 ms each), never later. S3Gen
decodes a chunk only once ``LOOKAHEAD_TOKENS`` (3) tokens past it have been sampled, so every
token of the chunk has its alignment by then: timestamps hold no audio back, and cost no
latency. The price is at chunk edges: the path over the newest few tokens may still move as
later tokens come in (it settles within about ``2 * MAX_JUMP`` tokens, 320 ms). A word the path
reaches only after the chunk holding its start went out is sent with the next chunk, its start
moved up to that chunk's first sample (late by at most the time the path took to settle). In
batch mode (``streaming=False``) the whole path is known before the audio: no such shift.
"""

from __future__ import annotations

import re

import numpy as np
from loguru import logger

from chatterbox_sidecar.engines.base import SpanTiming
from chatterbox_sidecar.engines.chatterbox.t3.alignment import (
    SPEECH_TOKEN_SECONDS,
    AttentionAligner,
    text_token_words,
    word_timings,
)

_WORD = re.compile(r"\S+")


def piece_offsets(segment: str, pieces: list[str]) -> list[int | None]:
    """Where each piece of a segment starts in it (the engine splits over-long segments).

    Args:
        segment: The segment as the engine read it.
        pieces: Its pieces, in order.

    Returns:
        Per piece, its character offset in ``segment``, or None where the split changed its
        text (such a piece gets no word timings; the session times its words with the next).
    """
    out: list[int | None] = []
    cursor = 0
    for piece in pieces:
        at = segment.find(piece, cursor)
        out.append(at if at >= 0 else None)
        if at >= 0:
            cursor = at + len(piece)
    return out


class PieceTimer:
    """When each word of one T3 piece is spoken, from its alignment rows.

    Args:
        segment: Index of the piece's segment among those the engine read for the context.
        offset: Character offset of the piece in that segment.
        piece: The piece's text, as sent to T3.
        label: The T3 request id, for logs.
    """

    def __init__(self, segment: int, offset: int, piece: str, label: str = ""):
        self.segment = segment
        self.label = label
        self._spans = [(offset + m.start(), offset + m.end()) for m in _WORD.finditer(piece)]
        self._piece = piece
        self._token_words: list[int | None] = []
        self._aligner: AttentionAligner | None = None
        self._sent = 0  # words handed out
        self._tail_logged = False

    def begin(self, text_tokens: list[str] | None) -> None:
        """Set T3's text tokens for the piece (None: the backend sends no rows; no timings).

        Args:
            text_tokens: The tokens as strings, ``[START]`` to ``[STOP]``.
        """
        if not text_tokens:
            return
        self._token_words = text_token_words(text_tokens, self._piece)
        self._aligner = AttentionAligner(len(text_tokens))

    @property
    def steps(self) -> int:
        """Returns: speech tokens aligned so far."""
        return 0 if self._aligner is None else self._aligner.steps

    def add(self, rows: list[np.ndarray]) -> None:
        """Take the alignment rows of the next speech tokens, in order.

        Args:
            rows: One ``[heads, n_text]`` array per token.
        """
        if self._aligner is None:
            return
        for row in rows:
            self._aligner.step(row)
        if self._aligner.long_tail and not self._tail_logged:
            # Diagnostic only: the segment is not ended here (see benchmarks/NOTES.md, issue 17).
            self._tail_logged = True
            logger.info(
                f"T3 {self.label}: speech ran {self._aligner.steps} tokens, past the end of its "
                "text by the alignment (a missed stop token, or silence at the end)"
            )

    def take(self, chunk_start: float, chunk_end: float | None) -> tuple[SpanTiming, ...]:
        """The timings to send with an audio chunk: words begun before its end, not yet sent.

        Args:
            chunk_start: The chunk's first sample, in seconds from the piece's first.
            chunk_end: Just past its last sample, likewise; None for the piece's last chunk
                (every word the alignment reached goes out).

        Returns:
            The words' timings, in order, on the chunk's clock (starts at or after 0).
        """
        if self._aligner is None or self._sent >= len(self._spans):
            return ()
        timed = word_timings(
            self._aligner.positions(), self._token_words, len(self._spans), 0, SPEECH_TOKEN_SECONDS
        )
        out: list[SpanTiming] = []
        for word, start, end in timed[self._sent :]:
            if chunk_end is not None and start >= chunk_end:
                break
            start = max(0.0, start - chunk_start)
            end = max(start, end - chunk_start)
            a, b = self._spans[word]
            out.append(SpanTiming(self.segment, a, b, start, end))
            self._sent = word + 1
        return tuple(out)
