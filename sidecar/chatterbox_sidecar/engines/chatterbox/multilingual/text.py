"""The multilingual T3's text input: per-language preparation and its grapheme tokenizer.

Upstream (``mtl_tts.py`` and ``MTLTokenizer`` in ``models/tokenizers/tokenizer.py``) feeds T3
``[START]``, the ids of the prepared text, ``[STOP]``. The text is prepared in this order:

1. :func:`~..t3.text.punc_norm`, the Original's clean-up (CJK punctuation also ends a text);
2. lower case, then Unicode NFKD;
3. per language:

   - ``zh``: words are separated by spaces (spacy-pkuseg's segmenter, optional, see below),
     then each CJK character is spelled with its Cangjie code from ``Cangjie5_TC.json``: one
     ``[cj_<letter>]`` token per code letter (plus the character's index among those sharing
     the code, when not the first), then ``[cj_.]``;
   - ``ja``: words with kanji become hiragana, katakana and kana stay, with pykakasi (required:
     without it the server does not offer ``ja``); then NFKD again;
   - ``ko``: Hangul syllables are split into conjoining jamo (NFKD of step 2 already does
     exactly upstream's arithmetic decomposition);
   - ``he``, ``ru``: upstream adds niqqud (dicta-onnx) and stress marks (russian-text-stresser)
     only when those packages are installed, and neither is a dependency of upstream's package,
     so its own install speaks Hebrew without niqqud and Russian without stress marks. So does
     this one: the text goes in as it is (stated here and logged once at start);

4. the language token ``[xx]`` in front;
5. spaces become ``[SPACE]``; the grapheme BPE of ``grapheme_mtl_merged_expanded_v1.json``
   (2454 ids) encodes the result.

Optional packages (``pip install 'pipecat-chatterbox[multilingual]'``): ``pykakasi`` (pure
Python; Japanese is refused with ``unsupported`` without it) and ``spacy-pkuseg`` (a compiled
package that downloads its segmentation model on first use). Without a working segmenter,
Chinese is spelled without word spaces, as upstream does in that case; the sidecar logs it at
start.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from chatterbox_sidecar.engines.chatterbox.models import MULTILINGUAL_LANGUAGES
from chatterbox_sidecar.engines.chatterbox.t3.model import START_TEXT_TOKEN, STOP_TEXT_TOKEN
from chatterbox_sidecar.engines.chatterbox.t3.text import MULTILINGUAL_SENTENCE_ENDS, punc_norm

TOKENIZER_FILE = "grapheme_mtl_merged_expanded_v1.json"
CANGJIE_FILE = "Cangjie5_TC.json"
SPACE = "[SPACE]"
INSTALL_HINT = "pip install 'pipecat-chatterbox[multilingual]'"
#: What this server does not do that upstream's optional packages would (see the module doc).
NOT_PREPARED = {
    "he": "Hebrew is spoken without added niqqud (upstream's dicta-onnx step is not done)",
    "ru": "Russian is spoken without added stress marks (upstream's russian-text-stresser "
    "step is not done)",
}


def mtl_punc_norm(text: str) -> str:
    """Upstream's multilingual punctuation clean-up (the Original's, CJK endings accepted)."""
    return punc_norm(text, sentence_ends=MULTILINGUAL_SENTENCE_ENDS)


# --------------------------------------------------------------------------- Korean


def hangul_to_jamo(text: str) -> str:
    """Split precomposed Hangul syllables into conjoining jamo (leading, vowel, trailing).

    The same result as upstream's arithmetic decomposition (and as NFKD) for U+AC00-U+D7A3;
    everything else is left alone.
    """
    out = []
    for char in text:
        code = ord(char) - 0xAC00
        if 0 <= code < 11172:
            lead, rest = divmod(code, 21 * 28)
            vowel, tail = divmod(rest, 28)
            out.append(chr(0x1100 + lead) + chr(0x1161 + vowel))
            if tail:
                out.append(chr(0x11A7 + tail))
        else:
            out.append(char)
    return "".join(out)


# --------------------------------------------------------------------------- Japanese


def _is_kanji(char: str) -> bool:
    return 0x4E00 <= ord(char) <= 0x9FFF


def _is_katakana(char: str) -> bool:
    return 0x30A1 <= ord(char) <= 0x30FA


class KanaConverter:
    """Japanese words with kanji to hiragana, as upstream's ``hiragana_normalize``.

    pykakasi splits the text into words; a word holding a kanji becomes its hiragana reading
    (with a space before a reading that starts with は or へ, as upstream does), every other
    word stays as written. The result is NFKD-normalised.

    Raises:
        ImportError: If pykakasi is not installed.
    """

    def __init__(self):
        import pykakasi

        self._kakasi = pykakasi.kakasi()

    def __call__(self, text: str) -> str:
        """Returns: ``text`` with kanji words in hiragana."""
        out = []
        for item in self._kakasi.convert(text):
            word, hira = item["orig"], item["hira"]
            if any(_is_kanji(c) for c in word):
                out.append(" " + hira if hira[:1] in ("は", "へ") else hira)
            else:
                out.append(word)
        return unicodedata.normalize("NFKD", "".join(out))


# --------------------------------------------------------------------------- Chinese


class CangjieSpeller:
    """Chinese characters spelled as Cangjie tokens, as upstream's ``ChineseCangjieConverter``.

    Args:
        table: ``Cangjie5_TC.json``: a JSON list of entries, each a character, a tab, its code
            (more tab-separated fields may follow).
        segmenter: Splits a text into words (spacy-pkuseg's ``cut``), or None to leave the text
            unsegmented.
    """

    def __init__(self, table: str | Path, segmenter: Callable[[str], list[str]] | None = None):
        entries = json.loads(Path(table).read_text(encoding="utf-8"))
        if not isinstance(entries, list):
            raise ValueError(f"{table} is not a list of Cangjie entries")
        self._code: dict[str, str] = {}
        self._sharing: dict[str, list[str]] = {}
        for entry in entries:
            char, code = entry.split("\t")[:2]
            self._code[char] = code  # a later entry for a character wins, as upstream's dict
            self._sharing.setdefault(code, []).append(char)
        self.segmenter = segmenter

    def __len__(self) -> int:
        """Returns: characters in the table."""
        return len(self._code)

    def spell(self, char: str) -> str | None:
        """The Cangjie tokens of one character, or None for one the table lacks."""
        code = self._code.get(char)
        if code is None:
            return None
        index = self._sharing[code].index(char)
        letters = code + (str(index) if index else "")
        return "".join(f"[cj_{c}]" for c in letters) + "[cj_.]"

    def __call__(self, text: str) -> str:
        """Returns: ``text`` segmented into words, its characters (category Lo) spelled."""
        if self.segmenter is not None:
            text = " ".join(self.segmenter(text))
        out = []
        for char in text:
            spelled = self.spell(char) if unicodedata.category(char) == "Lo" else None
            out.append(char if spelled is None else spelled)
        return "".join(out)


def load_chinese_segmenter() -> Callable[[str], list[str]] | None:
    """spacy-pkuseg's word segmenter, or None (logged) when it cannot be had.

    Its first use downloads the segmentation model (needs network access once).
    """
    try:
        from spacy_pkuseg import pkuseg
    except ImportError:
        logger.warning(
            "Chinese: spacy-pkuseg is not installed; text is spelled without word spaces "
            f"(upstream's fallback). {INSTALL_HINT} adds it"
        )
        return None
    try:
        return pkuseg().cut
    except Exception as exc:  # noqa: BLE001 - its model download or load failed
        logger.warning(
            f"Chinese: spacy-pkuseg could not load its model ({type(exc).__name__}: {exc}); "
            "text is spelled without word spaces (upstream's fallback)"
        )
        return None


# --------------------------------------------------------------------------- the tokenizer


class MultilingualTokenizer:
    """The multilingual T3 tokenizer: per-language preparation, language token, grapheme BPE.

    Args:
        folder: The model folder, with ``grapheme_mtl_merged_expanded_v1.json`` and
            ``Cangjie5_TC.json``.
        chinese_segmenter: Word segmenter for Chinese; the default loads spacy-pkuseg's when
            it can (see :func:`load_chinese_segmenter`). None: no segmentation.

    Attributes:
        languages: The languages this tokenizer prepares: the model's 23, less any whose
            language token the vocabulary lacks or whose required package is missing.
        unavailable: Language code to the reason it is not offered.
    """

    def __init__(self, folder: str | Path, chinese_segmenter: Any = "auto"):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        self._tokenizer = Tokenizer.from_file(str(path))
        vocab = self._tokenizer.get_vocab()
        if vocab.get("[START]") != START_TEXT_TOKEN or vocab.get("[STOP]") != STOP_TEXT_TOKEN:
            raise ValueError(f"{path} is not the Chatterbox multilingual tokenizer")
        self.unavailable: dict[str, str] = {}
        self._prepare: dict[str, Callable[[str], str]] = {"ko": hangul_to_jamo}
        try:
            self._prepare["ja"] = KanaConverter()
        except ImportError:
            self.unavailable["ja"] = f"Japanese needs pykakasi ({INSTALL_HINT})"
        segmenter = load_chinese_segmenter() if chinese_segmenter == "auto" else chinese_segmenter
        self._prepare["zh"] = CangjieSpeller(folder / CANGJIE_FILE, segmenter)
        for language in MULTILINGUAL_LANGUAGES:
            if f"[{language}]" not in vocab:
                self.unavailable[language] = f"{path.name} has no [{language}] token"
        self.languages = tuple(x for x in MULTILINGUAL_LANGUAGES if x not in self.unavailable)
        self._language_ids = {x: vocab[f"[{x}]"] for x in self.languages}
        for language, reason in self.unavailable.items():
            logger.warning(f"Multilingual: '{language}' is not offered: {reason}")
        for language, note in NOT_PREPARED.items():
            if language in self.languages:
                logger.info(f"Multilingual: {note}")

    def __len__(self) -> int:
        """Returns: ids in the vocabulary (2454 for the real tokenizer)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def language_id(self, language: str) -> int:
        """Returns: the id of ``[language]``.

        Raises:
            ValueError: For a language this tokenizer does not offer.
        """
        try:
            return self._language_ids[language]
        except KeyError:
            reason = self.unavailable.get(language, "not one of the model's languages")
            raise ValueError(f"language '{language}' is not available: {reason}") from None

    def prepare(self, text: str, language: str) -> str:
        """The string the BPE encodes: cleaned, lower-cased, NFKD, prepared, language token.

        Raises:
            ValueError: For a language this tokenizer does not offer.
        """
        self.language_id(language)
        text = unicodedata.normalize("NFKD", mtl_punc_norm(text).lower())
        prepare = self._prepare.get(language)
        if prepare is not None:
            text = prepare(text).strip() if language == "ko" else prepare(text)
        return f"[{language}]{text}".replace(" ", SPACE)

    def encode(self, text: str, language: str | None = None) -> list[int]:
        """Token ids of one segment: ``[START]``, ``[language]``, the text, ``[STOP]``.

        Args:
            text: Text of one segment.
            language: ISO 639-1 code (None: ``en``).

        Raises:
            ValueError: For a language this tokenizer does not offer.
        """
        language = language or "en"
        ids = self._tokenizer.encode(self.prepare(text, language)).ids
        logger.debug(f"T3 text: [{language}] is id {ids[0]}, {len(ids) + 2} text tokens")
        return [START_TEXT_TOKEN, *ids, STOP_TEXT_TOKEN]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` with ``[SPACE]`` as spaces (for tests and logs)."""
        text = self._tokenizer.decode(ids, skip_special_tokens=False)
        return text.replace(" ", "").replace(SPACE, " ")
