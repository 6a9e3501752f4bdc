"""Mapping normalised segments back to the client's words (chatterbox_sidecar.words), and the
segmenter's record of where each segment came from."""

from __future__ import annotations

import re

import pytest
from chatterbox_sidecar.text import TextSegmenter
from chatterbox_sidecar.words import WordTimeline, align_tokens, segment_owners
from hypothesis import given, settings
from hypothesis import strategies as st


class _Recording(WordTimeline):
    """A timeline that also keeps every word it handed out."""

    def take(self, final_time=None):
        out = super().take(final_time)
        self.__dict__.setdefault("sent", []).extend((w.word, w.start) for w in out)
        return out


def timeline_sent(timeline):
    return timeline.__dict__.get("sent", [])


def cuts(*pieces: str, max_chars: int = 300):
    segmenter = TextSegmenter(max_chars=max_chars)
    spans = [span for piece in pieces for span in segmenter.push_sources(piece)]
    return spans + segmenter.flush_sources()


def spoken_as(text: str) -> list[tuple[str, str]]:
    """(normalised word, client word it is mapped to) for a whole text."""
    timeline = WordTimeline()
    spans = cuts(text)
    timeline.add_sources(spans)
    words = [w.text for w in timeline._words]
    out = []
    segments = [segment for span in spans for segment in span.segments]
    for segment, (first, owners) in zip(segments, timeline._segments, strict=True):
        out += [(m[0], words[first + owners[m.start()]]) for m in re.finditer(r"\S+", segment)]
    return out


def test_sources_cover_the_text_in_order_with_offsets():
    text = "Hello there.   It costs $5 million — no, I think—actually so.\n\n---\n\nBye! "
    spans = cuts(text[:17], text[17:40], text[40:])
    assert [s.text for s in spans] == [text[s.start : s.start + len(s.text)] for s in spans]
    # Every non-blank character is in one span, in order; only whitespace lies between them.
    ends = [0] + [s.start + len(s.text) for s in spans]
    assert all(not text[a : s.start].strip() for a, s in zip(ends, spans, strict=False))
    assert not text[ends[-1] :].strip()
    assert any(not s.segments for s in spans)  # the "---" rule says nothing but is kept
    # Cutting into pieces gives the same segments as push/flush.
    segmenter = TextSegmenter()
    plain = segmenter.push(text) + segmenter.flush()
    assert [seg for s in spans for seg in s.segments] == plain


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("It costs $5 million.", [("five", "$5"), ("dollars.", "million.")]),
        ("Call Dr. Smith at 3:30 pm.", [("Doctor", "Dr."), ("thirty", "3:30"), ("M.", "pm.")]),
        ("The 1990s were fun.", [("nineteen", "1990s"), ("nineties", "1990s")]),
        ("Dial (555) 123-4567 now.", [("five", "(555)"), ("one", "123-4567"), ("now.", "now.")]),
        ("It's 50% off & free.", [("percent", "50%"), ("and", "&"), ("free.", "free.")]),
        ("So 3 km/h vs 5mph.", [("versus", "vs"), ("miles", "5mph.")]),
    ],
)
def test_normalised_words_map_back_to_the_client_words(text, expected):
    mapping = spoken_as(text)
    for pair in expected:
        assert pair in mapping, mapping
    # Monotonic: client words appear in the order they were written.
    client = text.split()
    order = [client.index(word) for _, word in mapping]
    assert order == sorted(order)


def test_align_tokens_prefers_matches_and_leaves_no_speaking_word_out():
    words = ["$5", "million", "—", "ok"]
    assert align_tokens(words, ["five", "million", "dollars", "ok"]) == [0, 1, 1, 3]
    assert align_tokens([], ["a"]) == [] and align_tokens(["a"], []) == []


def test_segment_owners_give_punctuation_to_the_word_before_and_spaces_to_none():
    (span,) = cuts("Hi, you!")
    (owners,) = segment_owners(span)
    assert owners == [0, 0, 0, None, 1, 1, 1, 1]


def test_timeline_hands_each_word_out_once_in_order_with_silent_words_at_the_next_start():
    spans = cuts("Hello — world. Bye 🙂")
    timeline = WordTimeline()
    timeline.add_sources(spans)
    assert timeline.segments == 2
    hello_world, bye = [s for span in spans for s in span.segments]
    assert hello_world == "Hello, world." and bye == "Bye 🙂"
    assert timeline.take() == []  # nothing timed yet
    timeline.time(0, 0, 5, 0.1, 0.4)  # "Hello"
    assert [(w.word, w.start) for w in timeline.take()] == [("Hello", 0.1)]
    timeline.time(0, 7, 13, 0.6, 0.9)  # "world."
    got = timeline.take()
    assert [(w.word, w.start, w.end) for w in got] == [("—", 0.6, 0.6), ("world.", 0.6, 0.9)]
    timeline.time(1, 0, 3, 1.2, 1.4)
    assert [w.word for w in timeline.take()] == ["Bye"]
    final = timeline.take(final_time=1.5)
    assert [(w.word, w.start, w.end) for w in final] == [("🙂", 1.5, 1.5)]
    assert timeline.take(final_time=1.5) == []


def test_timeline_starts_never_decrease_and_untimed_words_go_with_later_ones():
    timeline = WordTimeline()
    timeline.add_sources(cuts("one two three four"))
    timeline.time(0, 14, 18, 0.9, 1.0)  # only "four" timed: the rest go with it
    got = timeline.take()
    assert [w.word for w in got] == ["one", "two", "three", "four"]
    assert [w.start for w in got] == [0.9] * 4
    timeline2 = WordTimeline()
    timeline2.add_sources(cuts("a b"))
    timeline2.time(0, 0, 1, 0.5, 0.6)
    timeline2.time(0, 2, 3, 0.3, 0.4)  # an engine's odd report cannot go back in time
    assert [w.start for w in timeline2.take()] == [0.5, 0.5]


def test_word_cut_across_pieces_is_one_word_and_late_text_is_never_lost():
    # Text arriving token by token: "Hel" + "lo there." is the word "Hello".
    segmenter = TextSegmenter()
    timeline = WordTimeline()
    for piece in ["Hel", "lo there. ", "And more"]:
        timeline.add_sources(segmenter.push_sources(piece))
    timeline.add_sources(segmenter.flush_sources())
    assert [w.text for w in timeline._words] == ["Hello", "there.", "And", "more"]
    # A first clause cut at a dash inside a word: the word's rest follows in the next span.
    segmenter = TextSegmenter()
    timeline = WordTimeline()
    timeline.add_sources(segmenter.push_sources("I was thinking quite hard—n"))
    timeline.time(0, 0, 1, 0.0, 0.1)
    timeline.time(0, 21, 26, 1.0, 1.2)
    sent = [w.word for w in timeline.take()]
    assert sent == ["I", "was", "thinking", "quite", "hard—"]
    timeline.add_sources(segmenter.push_sources("evermind that."))
    timeline.add_sources(segmenter.flush_sources())
    rest = [w.word for w in timeline.take(final_time=3.0)]
    assert "".join(sent + rest) == "".join("I was thinking quite hard—nevermind that.".split())


_PIECES = st.lists(
    st.lists(
        st.sampled_from(
            [*"ab Z9$€%.,;:!?-—/()*_#@&'\"\n\t", "🙂", "é", "1,000", "Dr. ", "3:30 pm"]
        ),
        max_size=30,
    ).map("".join),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(pieces=_PIECES)
def test_any_text_in_any_pieces_gives_each_word_once(pieces):
    segmenter = TextSegmenter(max_chars=20, first_clause_min_chars=5)
    timeline = _Recording()
    for piece in pieces:
        timeline.add_sources(segmenter.push_sources(piece))
    timeline.add_sources(segmenter.flush_sources())
    # Time every character of every segment, in order, a tenth of a second each.
    for k, (_, owners) in enumerate(timeline._segments):
        for c in range(len(owners)):
            timeline.time(k, c, c + 1, 0.1 * (k + c), 0.1 * (k + c) + 0.05)
        timeline.take()
    timeline.take(final_time=1000.0)
    words = [w for w, _ in timeline_sent(timeline)]
    assert "".join(words) == "".join("".join(pieces).replace("\r", "").split())
    starts = [s for _, s in timeline_sent(timeline)]
    assert starts == sorted(starts)
