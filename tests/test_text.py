"""Text normalisation and incremental segmentation (fast; no audio)."""

import re
import time

import pytest
from chatterbox_sidecar.text import TextSegmenter, normalize_text, split_text
from hypothesis import given, settings
from hypothesis import strategies as st

# --------------------------------------------------------------------------- normalisation

NORMALIZE_CASES = [
    # cardinals, decimals, negatives (Kokoro-FastAPI #259: "3,497")
    ("3,497", "three thousand four hundred and ninety-seven"),
    ("1,000,000", "one million"),
    ("It has 12 parts.", "It has twelve parts."),
    ("3.5", "three point five"),
    ("0.25", "zero point two five"),
    ("-12", "minus twelve"),
    ("1,2,3", "one, two, three"),
    ("007", "zero zero seven"),
    (
        "12345678901234567890",
        " ".join("one two three four five six seven eight nine zero".split() * 2),
    ),
    ("version 1.2.3", "version one point two point three"),
    ("10-20 pages", "ten to twenty pages"),
    ("COVID-19", "COVID-nineteen"),
    ("H100 GPU", "H one hundred GPU"),
    # currency
    ("It costs $3.50.", "It costs three dollars and fifty cents."),
    ("$1", "one dollar"),
    ("$0.99", "ninety-nine cents"),
    ("$0.01", "one cent"),
    ("$3,497", "three thousand four hundred and ninety-seven dollars"),
    ("$1.2 million", "one point two million dollars"),
    ("$10k", "ten thousand dollars"),
    ("$100 bn", "one hundred billion dollars"),
    ("-$5", "minus five dollars"),
    ("$5-$10", "five dollars to ten dollars"),
    ("€5", "five euros"),
    ("£2.50", "two pounds and fifty pence"),
    ("50¢", "fifty cents"),
    # percentages, temperatures, units
    ("5%", "five percent"),
    ("-3.5%", "minus three point five percent"),
    ("40–60°C", "forty to sixty degrees Celsius"),
    ("approx. 5 km", "approximately five kilometers"),
    ("1 km", "one kilometer"),
    ("5 km/h", "five kilometers per hour"),
    # times
    ("3:30 pm", "three thirty P M"),
    ("3:30 p.m. with friends", "three thirty P M with friends"),
    ("See you at 3 p.m.", "See you at three P M."),
    ("10am", "ten A M"),
    ("15:45", "fifteen forty-five"),
    ("15:00", "fifteen hundred"),
    ("12:00", "twelve o'clock"),
    ("3:05", "three oh five"),
    # ordinals, years, dates
    ("1st", "first"),
    ("22nd", "twenty-second"),
    ("on March 3rd", "on March third"),
    ("in 1999", "in nineteen ninety-nine"),
    ("since 2010.", "since twenty ten."),
    ("the 1990s", "the nineteen nineties"),
    ("2024-01-15", "January fifteenth, twenty twenty-four"),
    ("Jan. 5, 2024", "January fifth, twenty twenty-four"),
    ("in January 2024", "in January twenty twenty-four"),
    # phone numbers: digit by digit, grouped
    ("Call (555) 123-4567", "Call five five five, one two three, four five six seven"),
    ("555-1234", "five five five, one two three four"),
    ("+44 20 7946 0958", "plus four four, two zero, seven nine four six, zero nine five eight"),
    # abbreviations
    ("Dr. Smith", "Doctor Smith"),
    ("Mr. and Mrs. Jones met Ms. Lee", "Mister and Missus Jones met Miz Lee"),
    ("St. Louis", "Saint Louis"),
    ("He lives on Main St.", "He lives on Main Street."),
    ("cats vs. dogs", "cats versus dogs"),
    ("apples, pears, etc.", "apples, pears, et cetera."),
    ("e.g. this, i.e. that", "for example this, that is that"),
    ("No. 5", "number five"),
    ("the U.S. Army", "the U S Army"),
    # symbols, e-mail, URLs
    ("Tom & Jerry", "Tom and Jerry"),
    ("2 + 2 = 4", "two plus two equals four"),
    ("#1 fan", "number one fan"),
    ("24/7", "twenty-four seven"),
    ("1/2 cup", "one half cup"),
    ("3/4 mile", "three quarters mile"),
    ("$5/month", "five dollars per month"),
    ("and/or", "and or"),
    ("ratio 16:9", "ratio sixteen to nine"),
    ("Call 1-800-555-1234", "Call one, eight zero zero, five five five, one two three four"),
    ("mail john.doe@example.com", "mail john dot doe at example dot com"),
    (
        "Visit https://example.com/docs/page-one?x=1.",
        "Visit example dot com slash docs slash page dash one.",
    ),
    ("see www.example.org.", "see w w w dot example dot org."),
    # markdown, typography, whitespace
    ("# Title", "Title"),
    ("- item **bold** and *italic* and `code`", "item bold and italic and code"),
    ("1. First item", "First item"),
    ("[the docs](http://x.com)", "the docs"),
    ("“Quoted” ‘text’ — with dashes… ok", "\"Quoted\" 'text', with dashes... ok"),
    ("a   b\n\n c\t", "a b c"),
    ("(see above).", "see above."),
    ("Wow!!!", "Wow!"),
    ("Well, then,", "Well, then,"),
    ("Note:", "Note,"),
]


@pytest.mark.parametrize(("raw", "spoken"), NORMALIZE_CASES)
def test_normalize_text(raw, spoken):
    assert normalize_text(raw) == spoken


@pytest.mark.parametrize("raw", ["", "   ", "**", "- ", "...", "```"])
def test_normalize_text_leaves_nothing_speakable(raw):
    assert not re.search(r"\w", normalize_text(raw))


def test_normalized_text_has_no_digits_or_markup():
    text = "**Total:** $1,234.56 (or 3,497 units) at 15:45 on 2024-01-15, 5% off & #1!"
    spoken = normalize_text(text)
    assert not re.search(r"[\d*$%&#()]", spoken)
    assert "one thousand two hundred and thirty-four dollars and fifty-six cents" in spoken
    assert "three thousand four hundred and ninety-seven units" in spoken


# --------------------------------------------------------------------------- segmentation


def stream(text: str, chunks: list[int] | None = None, **kwargs) -> list[str]:
    """Push ``text`` in pieces (one character at a time by default), then flush."""
    segmenter = TextSegmenter(**kwargs)
    out, pos = [], 0
    for size in chunks or [1] * len(text):
        out += segmenter.push(text[pos : pos + size])
        pos += size
    out += segmenter.push(text[pos:])
    return out + segmenter.flush()


def test_terminator_waits_for_whitespace_or_flush():
    segmenter = TextSegmenter()
    assert segmenter.push("Hello.") == []
    assert segmenter.push(" ") == ["Hello."]
    assert segmenter.push("World") == []
    assert segmenter.flush() == ["World"]
    assert segmenter.flush() == []


def test_sentences_are_separate_segments():
    text = "Dr. Smith paid $3.50 at 3:30 pm. Then he left! Did he? Ok. Bye"
    assert split_text(text) == [
        "Doctor Smith paid three dollars and fifty cents at three thirty P M.",
        "Then he left!",
        "Did he?",
        "Ok.",
        "Bye",
    ]


def test_char_by_char_stream_equals_whole_text():
    text = "Dr. Smith paid $3.50 at 3:30 pm. Then he left!"
    assert stream(text) == split_text(text)
    assert len(split_text(text)) == 2


@pytest.mark.parametrize(
    "text",
    [
        "It is 3.5 meters long, e.g. this one is.",
        "Dr. Smith and Mr. Jones met Mrs. Lee.",
        "The U.S. Army moved in.",
        "Ask J. R. Tolkien about it.",
        "They met at St. Paul's church.",
        "Cats vs. dogs is approx. even.",
        "We ate apples, pears, etc. and more.",
        "See fig. and No. 5 here.",
        "The site example.com is up.",
        "See you at 3 p.m. tomorrow.",
        "It was a one-off...",
    ],
)
def test_abbreviations_and_decimals_do_not_split(text):
    assert len(split_text(text, first_clause_min_chars=1000)) == 1


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("We ate apples, etc. Then we left.", 2),
        ("Meet me at 3 p.m. Then we eat.", 2),
        ("He lives on Main St. He likes it.", 2),
        ("No. I will not.", 2),
        ("Wait... What?", 2),
        ('He said "Stop." Then he left.', 2),
        ("One!Two? Three.", 2),
    ],
)
def test_sentence_boundaries(text, count):
    assert len(split_text(text, first_clause_min_chars=1000)) == count


def test_newlines_split_markdown_but_not_wrapped_prose():
    text = (
        "# Title\nSome intro:\n- item one\n- item two\n1. first\n2. second\n\n"
        "New one. Wrapped\nline."
    )
    expected = ["Title", "Some intro,", "item one", "item two", "first", "second", "New one."]
    assert split_text(text) == [*expected, "Wrapped line."]
    assert stream(text) == split_text(text)


def test_crlf_paragraphs_split_even_when_cut_between_pushes():
    text = "First paragraph here\r\n\r\nSecond one"
    assert split_text(text) == ["First paragraph here", "Second one"]
    assert stream(text, [21, 2, 1]) == split_text(text)


def test_first_segment_is_cut_at_first_long_enough_clause():
    text = "Well, I think that we should go now, because it is late. Later, when we rest, we talk."
    assert split_text(text) == [
        "Well, I think that we should go now,",
        "because it is late.",
        "Later, when we rest, we talk.",
    ]
    assert split_text(text, first_clause_min_chars=3) == [
        "Well,",
        "I think that we should go now, because it is late.",
        "Later, when we rest, we talk.",
    ]
    assert split_text(text, first_clause_min_chars=1000)[0] == (
        "Well, I think that we should go now, because it is late."
    )


def test_first_clause_cut_does_not_break_numbers_or_times():
    text = "We counted 3,497 people at 15:45 today; then we went home."
    assert split_text(text) == [
        "We counted three thousand four hundred and ninety-seven people"
        " at fifteen forty-five today,",
        "then we went home.",
    ]


def test_clause_cut_waits_for_whitespace_after_comma():
    segmenter = TextSegmenter()
    assert segmenter.push("We counted the visitors at 3,") == []
    assert segmenter.push("497") == []
    assert segmenter.push(" people today, and") == [
        "We counted the visitors at three thousand four hundred and ninety-seven people today,"
    ]


def test_lone_punctuation_is_dropped_short_sentences_kept():
    assert split_text("Ok. . Yes! ... -") == ["Ok.", "Yes!"]
    segmenter = TextSegmenter()
    assert segmenter.push(". ") == []
    assert segmenter.push("Ok, this is a long enough clause, really. ") == [
        "Ok, this is a long enough clause,",
        "really.",
    ]


def test_long_sentence_splits_at_clauses_before_words():
    clauses = [f"clause number {word} has a few words in it" for word in "abcdefghij"]
    text = ", ".join(clauses) + "."
    segments = split_text(text, max_chars=100, first_clause_min_chars=1000)
    assert all(len(s) <= 100 for s in segments)
    assert all(s.endswith((",", ".")) for s in segments)
    assert " ".join(segments) == text


def test_long_sentence_without_punctuation_splits_at_words_keeping_amounts():
    text = " ".join(f"item {i} cost $1,234.56 today" for i in range(30))
    segments = split_text(text, max_chars=120)
    assert all(len(s) <= 120 for s in segments)
    assert " ".join(segments).split() == normalize_text(text).split()
    amount = "one thousand two hundred and thirty-four dollars and fifty-six cents"
    assert sum(s.count(amount) for s in segments) == 30


def test_overlong_word_is_cut_only_as_last_resort():
    segments = split_text("a" * 700 + " end.")
    assert [len(s) for s in segments] == [300, 300, 100, 4]
    assert "".join(segments).replace(" ", "") == "a" * 700 + "end."


def test_endless_stream_is_cut_before_it_ends():
    segmenter = TextSegmenter(max_chars=100)
    out = []
    for _ in range(200):
        out += segmenter.push("word ")
    assert out, "a sentence that never ends must still be spoken"
    assert all(len(s) <= 100 for s in out)
    assert out + segmenter.flush() == split_text("word " * 200, max_chars=100)


def test_invalid_limits():
    with pytest.raises(ValueError):
        TextSegmenter(max_chars=5)
    with pytest.raises(ValueError):
        TextSegmenter(first_clause_min_chars=-1)


def test_large_text_is_fast():
    text = "This is sentence number 3,497, and it costs $3.50 at 3:30 pm. " * 1600  # ~100k chars
    start = time.perf_counter()
    segments = split_text(text)
    assert time.perf_counter() - start < 10
    assert len(segments) == 1601  # the first sentence is cut at its first clause


# --------------------------------------------------------------------------- properties

_ABBREVIATION_WORDS = {"mr", "mrs", "ms", "dr", "prof", "jr", "sr", "mt", "st", "vs", "etc", "no"}
_ABBREVIATION_WORDS |= {"approx", "cf", "dept", "v", "e", "i", "www", "com", "org", "net", "io"}
words = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=14).filter(
    lambda w: w not in _ABBREVIATION_WORDS
)
separators = st.sampled_from([" ", " ", " ", ", ", ". ", "! ", "? ", "; ", ": ", "\n", "\n\n"])
plain_texts = st.lists(st.tuples(words, separators), min_size=1, max_size=150).map(
    lambda pairs: "".join(w.capitalize() if i % 7 == 0 else w + s for i, (w, s) in enumerate(pairs))
)


@settings(max_examples=150, deadline=None)
@given(
    text=plain_texts,
    max_chars=st.integers(20, 120),
    chunks=st.lists(st.integers(1, 10), max_size=100),
)
def test_segments_fit_and_preserve_words(text, max_chars, chunks):
    segments = split_text(text, max_chars=max_chars)
    assert stream(text, chunks, max_chars=max_chars) == segments
    assert all(0 < len(s) <= max_chars for s in segments)
    assert all(s == s.strip() and re.search(r"\w", s) for s in segments)
    got = re.findall(r"[A-Za-z]+", " ".join(segments))
    # a word longer than max_chars is the only thing that may be cut inside
    assert "".join(got) == "".join(re.findall(r"[A-Za-z]+", text))
    if all(len(w) < max_chars for w in re.findall(r"[A-Za-z]+", text)):
        assert got == re.findall(r"[A-Za-z]+", text)


MIXED_PIECES = [
    "Dr. Smith paid $3.50 at 3:30 pm.",
    "Then he left!",
    "It is 3.5 m, e.g. this one, and the U.S. Army agreed",
    "apples, pears, etc.",
    "We have 3,497 items (approx. 5%) on 2024-01-15",
    "Call (555) 123-4567 now",
    "# Heading\n- item **one**\n- item two\n",
    "Well — maybe; who knows:",
    "She said “yes…” twice.",
    "In 1999 the price was $1.2 million?",
    "Visit https://example.com/a-b. Mail bob@example.org",
]


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(MIXED_PIECES), min_size=1, max_size=8),
    glue=st.sampled_from([" ", "\n", "  ", "\n\n"]),
    chunks=st.lists(st.integers(1, 12), max_size=200),
    max_chars=st.sampled_from([40, 80, 300]),
)
def test_any_chunking_streams_like_the_whole_text(pieces, glue, chunks, max_chars):
    text = glue.join(pieces)
    whole = split_text(text, max_chars=max_chars)
    assert stream(text, chunks, max_chars=max_chars) == whole
    assert all(0 < len(s) <= max_chars for s in whole)


def test_paralinguistic_tags_pass_untouched_when_the_model_performs_them():
    tags = ("[laugh]", "[clear throat]", "[sigh]")
    text = "Hi [laugh] it costs $5 [Clear Throat] okay. [sigh] Fine."
    assert "[" not in normalize_text(text)  # without tags: brackets are read as pauses
    assert split_text(text, keep_tags=tags) == [
        "Hi [laugh] it costs five dollars [clear throat] okay.",
        "[sigh] Fine.",
    ]
    segmenter = TextSegmenter(keep_tags=tags)
    pieces = [segmenter.push(c) for c in "Well [laugh] that was fun. "]
    assert [s for p in pieces for s in p] == ["Well [laugh] that was fun."]
