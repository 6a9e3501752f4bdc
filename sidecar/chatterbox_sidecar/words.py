"""Word timestamps: from engine timings on normalised segments back to the client's words.

The client's words are its text as sent, split on whitespace, punctuation attached. Engines
speak normalised segments ("$5" becomes "five dollars"), and those that can align report when
character spans of a segment are spoken. A :class:`WordTimeline` per context maps each
segment character to the client word it stands for (:func:`segment_owners`, a monotonic
alignment of spelled-out tokens to words) and hands out each word once, in order, as soon as
its start is known. Pure bookkeeping: no I/O, no engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from chatterbox_sidecar.text import SourceSpan, normalize_text

_TOKEN = re.compile(r"[^\W_]+")
_SKIP_COST = 3  # a word left without a token costs more than one and a half matches
_WORD = re.compile(r"\S+")


def _tokens(text: str) -> list[tuple[str, int, int]]:
    return [(m[0].lower(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


@lru_cache(maxsize=4096)
def _spoken_tokens(word: str) -> tuple[frozenset[str], str]:
    """A client word's possible spoken tokens, and its letters and digits run together.

    The tokens are its own and those of its normalised form, lower-case.
    """
    own = _tokens(word)
    spoken = frozenset(t for t, _, _ in own + _tokens(normalize_text(word)))
    return spoken, "".join(t for t, _, _ in own)


def _match(token: str, expected: tuple[frozenset[str], str]) -> int:
    tokens, letters = expected
    if token in tokens:
        return 2
    return 1 if token in letters else 0  # "P M" from "pm", "w w w" from "www"


def align_tokens(words: list[str], tokens: list[str]) -> list[int]:
    """Assign each spoken token to the word it comes from, in order.

    A monotonic alignment that matches as many tokens as possible to a word whose own
    normalised form holds them, and leaves as few words (that speak something) without a
    token as it can. A token that matches no word stays with the word before it ("five
    million dollars" from "$5 million" gives "dollars" to "million").

    Args:
        words: The client's words (whitespace-separated, punctuation attached).
        tokens: The lower-case letter-and-digit runs of the normalised text, in order.

    Returns:
        For each token, the index of its word (non-decreasing). Empty if ``words`` is.
    """
    n_words, n_tokens = len(words), len(tokens)
    if not n_words or not n_tokens:
        return []
    expected = [_spoken_tokens(w) for w in words]
    # skipped[i]: cost of the words before i that speak something, were no token on them.
    skipped = [0] * (n_words + 1)
    for i, e in enumerate(expected):
        skipped[i + 1] = skipped[i] + (_SKIP_COST if e[0] else 0)
    neg = -(10**9)
    score = [0] * n_words
    back: list[list[int]] = []
    for j, token in enumerate(tokens):
        new = [neg] * n_words
        choice = [0] * n_words
        best, best_i = neg, -1  # max over i' < i of score[i'] + skipped[i' + 1]
        for i in range(n_words):
            match = _match(token, expected[i])
            if j == 0:
                new[i], choice[i] = match - skipped[i], i
            else:
                stay = score[i]
                move = best - skipped[i] if best_i >= 0 else neg
                if move >= stay:  # on a tie the earlier token stays on the earlier word
                    new[i], choice[i] = move + match, best_i
                else:
                    new[i], choice[i] = stay + match, i
                if score[i] + skipped[i + 1] > best:
                    best, best_i = score[i] + skipped[i + 1], i
        score = new
        back.append(choice)
    last = max(range(n_words), key=lambda i: (score[i] - (skipped[n_words] - skipped[i + 1]), -i))
    path = [last]
    for j in range(n_tokens - 1, 0, -1):
        path.append(back[j][path[-1]])
    return path[::-1]


Owners = list[list[int | None]]


def segment_owners(span: SourceSpan) -> Owners:
    """Which of the span's words each character of its segments stands for.

    Args:
        span: A cut of the context's text and its normalised segments.

    Returns:
        One list per segment, one entry per character: the index of the word among the
        span's words (its whitespace-separated runs), or None for spaces (and for text before
        the first letter or digit). Punctuation belongs to the token before it.
    """
    words = [m[0] for m in _WORD.finditer(span.text)]
    seg_tokens = [_tokens(segment) for segment in span.segments]
    flat = [t for tokens in seg_tokens for t, _, _ in tokens]
    owners_of_tokens = align_tokens(words, flat)
    result: list[list[int | None]] = []
    k = 0
    for segment, tokens in zip(span.segments, seg_tokens, strict=True):
        owners: list[int | None] = [None] * len(segment)
        current: int | None = None
        starts = {start: (end, i) for i, (_, start, end) in enumerate(tokens)}
        pos = 0
        while pos < len(segment):
            if pos in starts:
                end, i = starts[pos]
                current = owners_of_tokens[k + i]
                owners[pos:end] = [current] * (end - pos)
                pos = end
                continue
            if not segment[pos].isspace():
                owners[pos] = current
            pos += 1
        k += len(tokens)
        result.append(owners)
    return result


@dataclass
class _Word:
    text: str
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class WordTime:
    """One client word and when it is spoken, in seconds from the context's first sample."""

    word: str
    start: float
    end: float


class WordTimeline:
    """One context's words: their text, their timings, and which have been sent.

    Feed it the text cuts in the order their segments go to the engine (:meth:`add_sources`),
    then the engine's timings (:meth:`time`); :meth:`take` hands out each word once, in order.
    A word with no timing of its own (nothing speakable in it, such as "—", or one the engine
    did not report) goes out with the next timed word, at that word's start; those left at
    the end go out at the end of the audio. Starts never decrease.
    """

    def __init__(self) -> None:
        """Initialize an empty timeline."""
        self._words: list[_Word] = []
        self._segments: list[tuple[int, list[int | None]]] = []  # (first word, owners)
        self._text_end = -1  # offset just past the last source's text
        self._open_word = False  # the last source ends inside a word
        self._sent = 0  # words handed out
        self._sent_chars: dict[int, int] = {}  # chars of a handed-out word already sent
        self._last_start = 0.0

    @property
    def segments(self) -> int:
        """Returns: segments registered so far."""
        return len(self._segments)

    @staticmethod
    def prepare(spans: list[SourceSpan]) -> list[Owners]:
        """The costly part of :meth:`add_sources` (it normalises each word), for a thread.

        Args:
            spans: Cuts from :meth:`TextSegmenter.push_sources` or ``flush_sources``.

        Returns:
            What :meth:`add_sources` takes as ``owners``.
        """
        return [segment_owners(span) for span in spans]

    def add_sources(self, spans: list[SourceSpan], owners: list[Owners] | None = None) -> None:
        """Register text cuts; their segments get the next segment indices, in order.

        Args:
            spans: Cuts from :meth:`TextSegmenter.push_sources` or ``flush_sources``.
            owners: ``prepare(spans)`` if already computed.
        """
        if owners is None:
            owners = self.prepare(spans)
        for span, span_owners in zip(spans, owners, strict=True):
            matches = list(_WORD.finditer(span.text))
            continues = bool(matches) and self._open_word and span.start == self._text_end
            continues = continues and matches[0].start() == 0
            first = len(self._words) - 1 if continues else len(self._words)
            for n, m in enumerate(matches):
                if n == 0 and continues:
                    self._words[first].text += m[0]
                else:
                    self._words.append(_Word(m[0]))
            self._segments.extend((first, segment) for segment in span_owners)
            self._text_end = span.start + len(span.text)
            self._open_word = bool(span.text) and not span.text[-1].isspace()

    def time(self, segment: int, start_char: int, end_char: int, start: float, end: float):
        """Record that characters of a segment are spoken from ``start`` to ``end``.

        Args:
            segment: The segment's index (the order the engine read them in).
            start_char: First character of the span in the normalised segment.
            end_char: Just past its last character.
            start: Seconds from the context's first audio sample.
            end: Seconds from the context's first audio sample.
        """
        if not 0 <= segment < len(self._segments):
            return
        first, owners = self._segments[segment]
        for index in {o for o in owners[max(0, start_char) : end_char] if o is not None}:
            word = self._words[first + index]
            word.start = start if word.start is None else min(word.start, start)
            word.end = end if word.end is None else max(word.end, end)

    def take(self, final_time: float | None = None) -> list[WordTime]:
        """Hand out the words that can go now, each once.

        Args:
            final_time: The context's whole audio duration, once its audio is complete: every
                word left goes out, untimed ones at this time. None while audio is coming.

        Returns:
            The words, in order.
        """
        out = self._late_text()
        last_timed = self._sent - 1
        for i in range(len(self._words) - 1, self._sent - 1, -1):
            if self._words[i].start is not None:
                last_timed = i
                break
        upto = len(self._words) if final_time is not None else last_timed + 1
        for i in range(self._sent, upto):
            word = self._words[i]
            if word.start is None:
                following = next(
                    (w.start for w in self._words[i + 1 : upto] if w.start is not None), None
                )
                at = following if following is not None else (final_time or self._last_start)
                start = end = at
            else:
                start, end = word.start, word.end if word.end is not None else word.start
            start = max(start, self._last_start)
            end = max(end, start)
            self._last_start = start
            out.append(WordTime(word.text, round(start, 3), round(end, 3)))
            self._sent_chars[i] = len(word.text)
        self._sent = max(self._sent, upto)
        return out

    def _late_text(self) -> list[WordTime]:
        """A handed-out word that grew since (its text was cut mid-word): the rest, once."""
        out: list[WordTime] = []
        for i, sent in list(self._sent_chars.items()):
            word = self._words[i]
            if len(word.text) > sent:
                at = self._last_start
                out.append(WordTime(word.text[sent:], round(at, 3), round(at, 3)))
                self._sent_chars[i] = len(word.text)
            if i < len(self._words) - 1:
                del self._sent_chars[i]  # a later word exists: this one cannot grow any more
        return out
