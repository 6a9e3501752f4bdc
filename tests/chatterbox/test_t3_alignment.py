"""T3 attention alignment (engines/chatterbox/t3/alignment.py) on synthetic attention maps.

The maps are built from a known path (each text token held for a known number of speech
tokens), blurred, with noise and spurious off-diagonal peaks such as real heads show; the
aligner must recover the path and the words' timings from them.
"""

from __future__ import annotations

import numpy as np
import pytest
from chatterbox_sidecar.engines.chatterbox.t3.alignment import (
    ALIGNMENT_HEADS,
    END_TOKENS,
    LONG_TAIL_STEPS,
    SPEECH_TOKEN_SECONDS,
    AttentionAligner,
    text_positions,
    text_token_words,
    word_timings,
)
from chatterbox_sidecar.engines.chatterbox.t3.text import T3Tokenizer, punc_norm

from .t3_checkpoint import real_tokenizer_path


def synthetic_attention(durations, rng, heads=3, noise=0.05, spurious=0.15, width=0.8):
    """``[steps, heads, n_text]`` attention following ``durations`` (speech tokens per text
    token), and the true position of each step."""
    n_text = len(durations)
    truth = np.repeat(np.arange(n_text), durations)
    cols = np.arange(n_text)
    maps = []
    for position in truth:
        flicker = rng.integers(n_text) if rng.random() < spurious else None  # a far token
        rows = []
        for _ in range(heads):
            row = np.exp(-((cols - position) ** 2) / (2 * width**2))
            row += noise * rng.random(n_text)
            if flicker is not None:
                row[flicker] += 1.0 + rng.random()
            rows.append(0.6 * row / row.sum())  # the rest of the mass is on other keys
        maps.append(rows)
    return np.asarray(maps), truth


def test_heads_are_upstreams():
    assert ALIGNMENT_HEADS == ((12, 15), (13, 11), (9, 2))


@pytest.mark.parametrize("seed", range(5))
def test_path_recovers_the_true_positions_where_argmax_flickers(seed):
    rng = np.random.default_rng(seed)
    durations = rng.integers(1, 5, size=40)
    attention, truth = synthetic_attention(durations, rng)
    path = text_positions(attention)
    assert np.all(np.diff(path) >= 0) and np.all(np.diff(path) <= 4)
    assert np.mean(np.abs(path - truth) <= 1) >= 0.97
    assert np.mean(path == truth) >= 0.8
    naive = attention.mean(axis=1).argmax(axis=1)  # per-step argmax follows the flickers
    assert np.sum(np.abs(naive - truth) > 2) >= 5
    assert np.sum(np.abs(path - truth) > 2) < np.sum(np.abs(naive - truth) > 2) / 5


def test_streaming_steps_give_the_batch_path_and_online_flags():
    rng = np.random.default_rng(7)
    durations = [2, 3, 1, 2, 4, 2, 3, 2, 2, 1]  # [START] ... [STOP]-like 10 tokens
    attention, truth = synthetic_attention(durations, rng, spurious=0.0)
    tail = np.zeros((LONG_TAIL_STEPS + 2, 3, len(durations)))
    tail[:, :, -2] = 0.6  # speech goes on while attending to the last tokens: a missed stop
    attention = np.concatenate([attention, tail])
    aligner = AttentionAligner(len(durations))
    assert aligner.position == 0 and aligner.steps == 0 and len(aligner.positions()) == 0
    flags = []
    for row in attention:
        aligner.step(row)
        flags.append((aligner.complete, aligner.suppress_stop, aligner.long_tail))
    assert np.array_equal(aligner.positions(), text_positions(attention))
    done_at = next(i for i, f in enumerate(flags) if f[0])
    assert truth[done_at] >= len(durations) - END_TOKENS
    assert all(f[1] for f in flags[:done_at]) and not any(f[1] for f in flags[done_at:])
    tail_at = next(i for i, f in enumerate(flags) if f[2])
    assert tail_at - done_at == LONG_TAIL_STEPS
    assert not AttentionAligner(END_TOKENS + 2).suppress_stop  # short texts are never held


def test_averaged_rows_and_bad_shapes():
    aligner = AttentionAligner(4)
    assert aligner.step(np.array([0.1, 0.5, 0.1, 0.0])) == 1
    assert aligner.step(np.zeros(4)) == 1  # no attention on the text: stay
    with pytest.raises(ValueError):
        aligner.step(np.ones(5))
    with pytest.raises(ValueError):
        AttentionAligner(0)


def test_word_timings_follow_the_path_to_within_a_token():
    text = "Well, it costs five dollars."
    # Text tokens: [START] Well , [SPACE] it [SPACE] costs [SPACE] five [SPACE] dollars . [STOP]
    tokens = ["[START]", "Well", ",", "[SPACE]", "it", "[SPACE]", "costs", "[SPACE]", "five",
              "[SPACE]", "dollars", ".", "[STOP]"]  # fmt: skip
    words = text_token_words(tokens, text)
    assert words == [None, 0, None, None, 1, None, 2, None, 3, None, 4, None, None]
    durations = [2, 6, 3, 1, 3, 1, 8, 1, 6, 1, 9, 4, 3]
    rng = np.random.default_rng(3)
    attention, truth = synthetic_attention(durations, rng)
    path = text_positions(attention)
    timings = word_timings(path, words, n_words=5, first_token=10)
    starts_at = np.cumsum([0, *durations])  # first speech token of each text token
    expected = [starts_at[p] for p, w in enumerate(words) if w is not None]
    assert [w for w, _, _ in timings] == [0, 1, 2, 3, 4]
    for (_, start, end), want in zip(timings, expected, strict=True):
        assert abs(start - (10 + want) * SPEECH_TOKEN_SECONDS) <= SPEECH_TOKEN_SECONDS + 1e-9
        assert end >= start
    # The last word ends where speech reaches the tokens after it ("." and [STOP]).
    assert abs(timings[-1][2] - (10 + starts_at[11]) * SPEECH_TOKEN_SECONDS) <= 0.041
    # Part-way through, only the words reached so far come back.
    part = word_timings(path[: starts_at[7]], words, n_words=5)
    assert [w for w, _, _ in part] == [0, 1, 2]


def test_a_skipped_word_starts_and_ends_with_the_next():
    words = [None, 0, None, 1, None, 2, None]
    path = [0, 1, 1, 5, 5, 6]  # jumped over word 1
    timings = word_timings(path, words, n_words=3)
    assert timings[1][1] == timings[1][2] == timings[2][1] == 3 * SPEECH_TOKEN_SECONDS


def test_text_token_words_on_the_real_tokenizer():
    tokenizer = T3Tokenizer(real_tokenizer_path())
    raw = tokenizer._tokenizer
    text = "it costs five dollars; isn't it?"
    ids = tokenizer.encode(text)
    strings = [raw.id_to_token(i) for i in ids]
    assert punc_norm(text).startswith("It costs")
    words = text_token_words(strings, text)
    assert len(words) == len(ids) and words[0] is None and words[-1] is None
    spelled = {}
    for token, word in zip(strings, words, strict=True):
        if word is not None:
            spelled[word] = spelled.get(word, "") + token
    assert [spelled[i].lower() for i in range(len(text.split()))] == [
        "it", "costs", "five", "dollars", "isnt", "it"
    ]  # fmt: skip
