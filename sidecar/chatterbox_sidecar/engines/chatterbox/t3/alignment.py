"""T3's text-to-speech attention alignment: which text token each speech token speaks.

While T3 speaks, a few of its self-attention heads look at the text token being said (upstream
Chatterbox's ``AlignmentStreamAnalyzer`` reads three heads of the 30-layer English model for
this, :data:`ALIGNMENT_HEADS`). Given, for each decoding step, those heads' attention from the
new speech token to the prompt's text tokens, :class:`AttentionAligner` follows the text
position with a monotonic Viterbi path (the position never goes back and moves at most
``max_jump`` text tokens per speech token), which rejects the off-diagonal flickers a per-step
argmax would follow. Speech tokens are 40 ms of audio each, so the path gives word timings
(:func:`word_timings`), and the same signal tells when the text is fully spoken
(:attr:`AttentionAligner.complete`) and when speech runs on past it
(:attr:`AttentionAligner.long_tail`).

Word timestamps only: the engine does not use ``long_tail`` or ``suppress_stop`` to end or hold
a segment (upstream did so, for its multilingual model). The alignment is recorded only for
requests that ask for timestamps, and a request's tokens must not depend on whether it asked;
the heads are upstream's for the multilingual checkpoint, unverified on the English one; a
missed stop token is already bounded by the per-piece speech-token budget
(``model_files.speech_token_budget``); and upstream removed its analyzer in its latest release.
A long tail is logged (``word_timing.PieceTimer``). benchmarks/NOTES.md (issue 17) has more.

Pure numpy over attention maps: no torch, no model. What a T3 backend must hand in
(:meth:`AttentionAligner.step`): per step and request, the attention probabilities of the step's
query over the text-token keys ``[START] text [STOP]`` (the softmax taken over all keys, then
sliced), from the conditional half of a CFG batch, for the heads in :data:`ALIGNMENT_HEADS` —
as ``[len(ALIGNMENT_HEADS), n_text]`` or already averaged to ``[n_text]``. Step 0 is the query
of the start-of-speech token (it predicts the first speech token).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# (layer, head) of the Llama_520M T3 (30 layers x 16 heads) whose attention follows the text,
# as found by upstream Chatterbox (its multilingual AlignmentStreamAnalyzer).
ALIGNMENT_HEADS: tuple[tuple[int, int], ...] = ((12, 15), (13, 11), (9, 2))
ALIGNMENT_MODEL = (30, 16)  # (layers, heads) of the model those heads belong to
SPEECH_TOKEN_SECONDS = 0.04  # S3 speech tokens run at 25 Hz
MAX_JUMP = 4  # text tokens the position may move per speech token (spaces, punctuation)
START_WINDOW = 3  # the path starts on one of the first text tokens
END_TOKENS = 3  # within this many tokens of the end, the text counts as spoken
LONG_TAIL_STEPS = 5  # speech tokens (200 ms) past the end that make a tail too long
_EPS = 1e-6
_SPECIAL = re.compile(r"\[[A-Za-z_]+\]")  # also the multilingual language tokens: [es]
_ALNUM = re.compile(r"[^\W_]")


def alignment_heads(n_layers: int, n_heads: int) -> tuple[tuple[int, int], ...]:
    """The ``(layer, head)`` pairs whose attention a T3 of this shape records for alignment.

    The 30-layer, 16-head T3 (the Llama_520M of the English and multilingual models) gets
    :data:`ALIGNMENT_HEADS`. A smaller network (the test checkpoints) gets each of those pairs
    taken modulo its own layer and head counts, ``(layer % n_layers, head % n_heads)``: the
    same number of captures, spread over the layers it has, so that the capture code runs on
    small models too. Their alignment follows no text (random or unrelated weights).

    Args:
        n_layers: Decoder layers of the model.
        n_heads: Attention heads per layer.

    Returns:
        One pair per entry of :data:`ALIGNMENT_HEADS`, in its order.
    """
    if n_layers < 1 or n_heads < 1:
        raise ValueError("a model needs at least one layer and one head")
    if (n_layers, n_heads) == ALIGNMENT_MODEL:
        return ALIGNMENT_HEADS
    return tuple((layer % n_layers, head % n_heads) for layer, head in ALIGNMENT_HEADS)


class AttentionAligner:
    """Follows one request's text position, one speech token (decoding step) at a time.

    Args:
        n_text: Text tokens the attention rows cover (``[START]`` and ``[STOP]`` included).
        max_jump: Most text tokens the position may advance in one step.
    """

    def __init__(self, n_text: int, max_jump: int = MAX_JUMP):
        if n_text < 1:
            raise ValueError("n_text must be at least 1")
        self.n_text = n_text
        self.max_jump = max_jump
        self._score: np.ndarray | None = None  # best log-score of a path ending at each position
        self._back: list[np.ndarray] = []  # per step: the previous position on that best path
        self._completed_at: int | None = None

    @property
    def steps(self) -> int:
        """Returns: speech tokens aligned so far."""
        return len(self._back)

    @property
    def position(self) -> int:
        """Returns: the text position of the latest speech token (0 before any step)."""
        return 0 if self._score is None else int(np.argmax(self._score))

    @property
    def complete(self) -> bool:
        """Returns: whether the speech has reached the last ``END_TOKENS`` text tokens."""
        return self._completed_at is not None

    @property
    def suppress_stop(self) -> bool:
        """Returns: whether a stop token now would cut the text short (a backend may mask it).

        Short texts (at most ``END_TOKENS + 2`` tokens) are never held back.
        """
        return not self.complete and self.n_text > END_TOKENS + 2

    @property
    def long_tail(self) -> bool:
        """Returns: whether speech ran ``LONG_TAIL_STEPS`` tokens past the text's end.

        That is a missed stop token: a backend may end the segment here.
        """
        if self._completed_at is None:
            return False
        return self.steps - self._completed_at >= LONG_TAIL_STEPS

    def step(self, attention: np.ndarray) -> int:
        """Take one speech token's attention over the text tokens.

        Args:
            attention: ``[n_text]`` or ``[heads, n_text]`` (averaged over heads) probabilities.

        Returns:
            The text position of this speech token on the best path so far.
        """
        row = np.asarray(attention, dtype=np.float64)
        if row.ndim == 2:
            row = row.mean(axis=0)
        if row.shape != (self.n_text,):
            raise ValueError(f"attention row of shape {row.shape}, expected ({self.n_text},)")
        total = row.sum()
        emission = np.log(row / total + _EPS) if total > 0 else np.zeros(self.n_text)
        if self._score is None:
            score = np.full(self.n_text, -np.inf)
            score[: START_WINDOW + 1] = emission[: START_WINDOW + 1]
            back = np.arange(self.n_text)
        else:
            # best[p]: the best score among positions p - max_jump .. p (monotonic moves).
            shifted = np.full((self.max_jump + 1, self.n_text), -np.inf)
            for d in range(self.max_jump + 1):
                shifted[d, d:] = self._score[: self.n_text - d]
            choice = np.argmax(shifted, axis=0)  # d; ties keep the smaller move
            score = shifted[choice, np.arange(self.n_text)] + emission
            back = np.arange(self.n_text) - choice
        self._score = score
        self._back.append(back)
        position = self.position
        if self._completed_at is None and position >= self.n_text - END_TOKENS:
            self._completed_at = self.steps
        return position

    def positions(self) -> np.ndarray:
        """The text position of every speech token so far, on the best monotonic path.

        The latest tokens' positions may still change as later steps come in; those older than
        about ``2 * max_jump`` steps are settled in practice.

        Returns:
            int array ``[steps]``, non-decreasing.
        """
        if self._score is None:
            return np.zeros(0, dtype=np.int64)
        path = np.empty(self.steps, dtype=np.int64)
        p = int(np.argmax(self._score))
        for t in range(self.steps - 1, -1, -1):
            path[t] = p
            p = int(self._back[t][p])
        return path


def text_positions(attention: np.ndarray, max_jump: int = MAX_JUMP) -> np.ndarray:
    """Align a whole attention map at once (see :class:`AttentionAligner`).

    Args:
        attention: ``[steps, n_text]`` or ``[steps, heads, n_text]`` probabilities.
        max_jump: Most text tokens the position may advance per speech token.

    Returns:
        The text position of each speech token, non-decreasing.
    """
    attention = np.asarray(attention)
    aligner = AttentionAligner(attention.shape[-1], max_jump)
    for row in attention:
        aligner.step(row)
    return aligner.positions()


def text_token_words(token_strings: Sequence[str], text: str) -> list[int | None]:
    """Which word of ``text`` each text token spells.

    T3 reads ``punc_norm(text)`` (punctuation and spacing changed, the first letter
    capitalised); letters and digits are the same in both, so tokens are matched to words
    through them. A token with none (``[START]``, ``[SPACE]``, punctuation, ``[UNK]``) gets None.

    Args:
        token_strings: The tokens as strings (the tokenizer's ``id_to_token``), in order.
        text: The segment the prompt was made from.

    Returns:
        For each token, the index of its word among ``text.split()``, or None.
    """
    owners = [n for n, m in enumerate(re.finditer(r"\S+", text)) for _ in _ALNUM.findall(m[0])]
    out: list[int | None] = []
    cursor = 0
    for token in token_strings:
        letters = 0 if _SPECIAL.fullmatch(token) else len(_ALNUM.findall(token))
        if letters == 0 or cursor >= len(owners):
            out.append(None)
            continue
        out.append(owners[cursor])
        cursor += letters
    return out


def word_timings(
    positions: Sequence[int],
    token_words: Sequence[int | None],
    n_words: int,
    first_token: int = 0,
    token_seconds: float = SPEECH_TOKEN_SECONDS,
) -> list[tuple[int, float, float]]:
    """When each word is spoken, from the text position of each speech token.

    A word starts at the first speech token whose position has reached it (or a later word)
    and ends where the next word starts; the last word ends where the speech reaches the text
    tokens after it (or at the last token). A word the path skipped starts and ends with the
    next one. Only words reached so far are returned.

    Args:
        positions: Text position per speech token (:meth:`AttentionAligner.positions`).
        token_words: Word index per text position (:func:`text_token_words`).
        n_words: Words in the segment.
        first_token: Index of ``positions[0]`` among the segment's speech tokens.
        token_seconds: Audio per speech token.

    Returns:
        ``(word, start_s, end_s)`` in word order, in seconds from the segment's first token.
    """
    # word_at[p]: the last word spelled at or before text position p (-1 before the first).
    word_at = np.full(len(token_words), -1, dtype=np.int64)
    last = -1
    for p, word in enumerate(token_words):
        last = word if word is not None else last
        word_at[p] = last
    spelled = [p for p, w in enumerate(token_words) if w is not None]
    end_of_words = spelled[-1] + 1 if spelled else len(token_words)
    reached = word_at[np.asarray(positions, dtype=np.int64)] if len(positions) else word_at[:0]
    starts: list[int] = []
    for word in range(n_words):
        hits = np.nonzero(reached >= word)[0]
        if len(hits) == 0:
            break
        starts.append(int(hits[0]))
    beyond = np.nonzero(np.asarray(positions) >= end_of_words)[0]
    out: list[tuple[int, float, float]] = []
    for word, start in enumerate(starts):
        if word + 1 < len(starts):
            end = starts[word + 1]
        elif word == n_words - 1 and len(beyond):
            end = max(start, int(beyond[0]))
        else:
            end = len(positions)
        out.append(
            (word, (first_token + start) * token_seconds, (first_token + end) * token_seconds)
        )
    return out
