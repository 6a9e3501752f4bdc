"""T3 text input: upstream's punctuation clean-up and the English tokenizer.

Both T3 backends feed the model ``[START] + punc_norm(text) + [STOP]``; the torch backend
tokenises it with :class:`T3Tokenizer`, the vLLM backend sends the string to chatterbox-vllm's
``EnTokenizer`` (same ``tokenizer.json``).
"""

from __future__ import annotations

from pathlib import Path

from chatterbox_sidecar.engines.chatterbox.t3.model import START_TEXT_TOKEN, STOP_TEXT_TOKEN

#: Upstream's punctuation replacements, in the order it applies them.
PUNC_REPLACEMENTS = (
    ("...", ", "),
    ("…", ", "),
    (":", ","),
    (" - ", ", "),
    (";", ", "),
    ("—", "-"),
    ("–", "-"),
    (" ,", ","),
    ("“", '"'),
    ("”", '"'),
    ("‘", "'"),
    ("’", "'"),
)
_SENTENCE_ENDS = (".", "!", "?", "-", ",")
#: The multilingual model's clean-up also takes CJK punctuation as an end (upstream mtl_tts.py).
MULTILINGUAL_SENTENCE_ENDS = (*_SENTENCE_ENDS, "、", "，", "。", "？", "！")
EMPTY_TEXT = "You need to add some text for me to talk."


def punc_norm(
    text: str,
    replacements: tuple[tuple[str, str], ...] = PUNC_REPLACEMENTS,
    sentence_ends: tuple[str, ...] = _SENTENCE_ENDS,
) -> str:
    """Clean punctuation the way upstream Chatterbox does before tokenising.

    Capitalises the first letter, collapses whitespace, maps rare punctuation to what the model
    saw in training and ends the text with punctuation, step for step as upstream (including
    the double spaces its replacements can leave). Blank text becomes upstream's stock sentence.

    Args:
        text: Text of one segment.
        replacements: The punctuation mapping, in order (Turbo keeps some of the Original's).
        sentence_ends: Endings that need no added full stop (the multilingual model's
            include CJK punctuation: :data:`MULTILINGUAL_SENTENCE_ENDS`).

    Returns:
        The cleaned text.
    """
    if not text.strip():
        return EMPTY_TEXT
    if text[0].islower():
        text = text[0].upper() + text[1:]
    text = " ".join(text.split())
    for old, new in replacements:
        text = text.replace(old, new)
    text = text.rstrip(" ")
    if not text.endswith(sentence_ends):
        text += "."
    return text


def t3_prompt(text: str) -> str:
    """The prompt string chatterbox-vllm's tokenizer expects for ``text``."""
    return "[START]" + punc_norm(text) + "[STOP]"


class T3Tokenizer:
    """The English T3 tokenizer (``tokenizer.json``: character-level BPE, ``[SPACE]`` for spaces).

    Args:
        path: The ``tokenizer.json`` file.
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))
        vocab = self._tokenizer.get_vocab()
        if vocab.get("[START]") != START_TEXT_TOKEN or vocab.get("[STOP]") != STOP_TEXT_TOKEN:
            raise ValueError(f"{path} is not the Chatterbox English tokenizer")

    def encode(self, text: str, language: str | None = None) -> list[int]:
        """Token ids of ``punc_norm(text)`` framed by the start and stop text tokens.

        Args:
            text: Text of one segment.
            language: Ignored: the English model has no language token (the engine refuses
                other languages before they get here).
        """
        body = punc_norm(text).replace(" ", "[SPACE]")
        return [START_TEXT_TOKEN, *self._tokenizer.encode(body).ids, STOP_TEXT_TOKEN]
