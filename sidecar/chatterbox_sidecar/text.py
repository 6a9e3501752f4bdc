"""Text preparation shared by every engine: segmentation and normalisation.

Engines read digits, symbols and markup badly ("3,497" as "thirty four ninety seven",
Kokoro-FastAPI #259) and Chatterbox garbles inputs past ~300 characters, so each context's text
goes through one :class:`TextSegmenter`. It cuts the raw text into sentences (the first one early,
at a clause, so the first audio comes sooner) and only then spells out each segment with
:func:`normalize_text`, so a number is never cut in two.

Languages (the multilingual model's ISO 639-1 codes): English gets every rule below. Other
languages get markdown stripping, punctuation clean-up and numbers in their own words through
num2words where it has the language (:data:`NUMBER_LANGUAGES`: decimal comma and grouping
dot where the language writes them so); their digits stay as written where it has not (el,
hi, ms, sw, zh), and English words (units, currencies, abbreviations, dates) are never put into
their text. Sentences also end at ``。！？`` (no space needed after them), ``।`` and ``॥``
(Devanagari), ``؟`` and ``۔`` (Arabic script) and, in Greek only, ``;`` (the Greek question
mark); ``，、；：`` and ``،؛`` are clause marks. Chinese, Japanese and Korean segments are cut at a
half (ja, ko) or a third (zh) of ``max_chars``, since each of their characters is a syllable.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from num2words import CONVERTER_CLASSES, num2words

# --------------------------------------------------------------------------- number words

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_MONTHS = (
    "January February March April May June July August September October November December"
).split()
_SCALES = {"k": "thousand", "m": "million", "b": "billion", "bn": "billion"}
_CURRENCIES = {  # symbol: (one, many, one hundredth, many hundredths)
    "$": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "¥": ("yen", "yen", "sen", "sen"),
}
_UNITS = {  # unit: (singular, plural)
    "km/h": ("kilometer per hour", "kilometers per hour"),
    "mph": ("mile per hour", "miles per hour"),
    "km": ("kilometer", "kilometers"),
    "cm": ("centimeter", "centimeters"),
    "mm": ("millimeter", "millimeters"),
    "kg": ("kilogram", "kilograms"),
    "lbs": ("pound", "pounds"),
    "lb": ("pound", "pounds"),
    "oz": ("ounce", "ounces"),
    "ft": ("foot", "feet"),
    "ms": ("millisecond", "milliseconds"),
    "ml": ("milliliter", "milliliters"),
    "KB": ("kilobyte", "kilobytes"),
    "MB": ("megabyte", "megabytes"),
    "GB": ("gigabyte", "gigabytes"),
    "TB": ("terabyte", "terabytes"),
    "kHz": ("kilohertz", "kilohertz"),
    "MHz": ("megahertz", "megahertz"),
    "GHz": ("gigahertz", "gigahertz"),
    "Hz": ("hertz", "hertz"),
}
_ABBREVIATIONS = {
    "Mr": "Mister", "Mrs": "Missus", "Ms": "Miz", "Dr": "Doctor", "Prof": "Professor",
    "Jr": "Junior", "Sr": "Senior", "Mt": "Mount", "vs": "versus", "etc": "et cetera",
    "e.g": "for example", "i.e": "that is", "approx": "approximately", "cf": "compare",
    "Dept": "Department",
}  # fmt: skip


def _digits(text: str) -> str:
    return " ".join(_DIGIT_WORDS[int(c)] for c in text if c.isdigit())


def _cardinal(text: str) -> str:
    """Words for a non-negative integer, thousands separators allowed ("3,497")."""
    text = text.replace(",", "")
    if len(text) > 15 or (len(text) > 1 and text[0] == "0"):
        return _digits(text)  # ids, zip codes, "007": read digit by digit
    return num2words(int(text)).replace(",", "")


def _number(text: str) -> str:
    """Words for a decimal number such as "-3,497.25"."""
    sign, text = ("minus ", text[1:]) if text[0] in "-−" else ("", text)
    whole, _, frac = text.partition(".")
    words = _cardinal(whole) if whole else "zero"
    return sign + words + (" point " + _digits(frac) if frac else "")


def _ordinal(text: str) -> str:
    return num2words(int(text.replace(",", "")), to="ordinal").replace(",", "")


def _year(text: str) -> str:
    return num2words(int(text), to="year").replace(",", "")


def _plural_words(words: str) -> str:
    return words[:-1] + "ies" if words.endswith("y") else words + "s"


# --------------------------------------------------------------------------- other languages

#: The multilingual model's languages whose number words num2words has.
NUMBER_LANGUAGES = frozenset(
    {"ar", "da", "de", "es", "fi", "fr", "he", "it", "ja", "ko", "nl", "no", "pl", "pt"}
    | {"ru", "sv", "tr"}
) & frozenset(CONVERTER_CLASSES)
# Languages that write 3.497,25 (grouping dot, decimal comma); the others write 3,497.25.
_DECIMAL_COMMA = frozenset(
    {"da", "de", "el", "es", "fi", "fr", "it", "nl", "no", "pl", "pt", "ru", "sv", "tr"}
)
# The word read for a decimal separator and for a minus sign (num2words' own decimals are
# wrong for some languages: Italian drops the fraction, Polish fails on negatives).
_POINT = {
    "ar": "فاصلة", "da": "komma", "de": "Komma", "es": "coma", "fi": "pilkku", "fr": "virgule",
    "he": "נקודה", "it": "virgola", "ja": "点", "ko": "점", "nl": "komma", "no": "komma",
    "pl": "przecinek", "pt": "vírgula", "ru": "запятая", "sv": "komma", "tr": "virgül",
}  # fmt: skip
_MINUS = {
    "ar": "سالب", "da": "minus", "de": "minus", "es": "menos", "fi": "miinus", "fr": "moins",
    "he": "מינוס", "it": "meno", "ja": "マイナス", "ko": "마이너스", "nl": "min", "no": "minus",
    "pl": "minus", "pt": "menos", "ru": "минус", "sv": "minus", "tr": "eksi",
}  # fmt: skip
# Of those, the ones that group thousands with a space ("1 234"), as well as a dot.
_SPACE_GROUPING = frozenset({"fi", "fr", "no", "pl", "ru", "sv"})
# Syllabic scripts: characters of a segment count this many times against max_chars.
_CHARS_PER_SYLLABLE = {"zh": 3, "ja": 2, "ko": 2}
_GREEK_QUESTION = "\u037e"  # holds ";" in Greek text while the clean-up runs


@lru_cache(maxsize=32)
def _number_pattern(language: str) -> re.Pattern[str]:
    """Numbers as ``language`` writes them: "-3.497,25" (de), "1 234" (fr), "3,497.25" (ja).

    A minus sign counts only after a space or an opening bracket ("Covid-19" has none); a
    number may follow a letter directly, as in Chinese, Japanese and Korean text.
    """
    if language in _DECIMAL_COMMA:
        point = ","
        group = r"[ .\u00a0\u202f]" if language in _SPACE_GROUPING else r"[.\u00a0\u202f]"
    else:
        point, group = r"\.", ","
    return re.compile(
        r"(?:(?<![^\s(\[\"'])(?P<neg>[-−])|(?<![\d.,]))"
        rf"(?P<whole>\d{{1,3}}(?:{group}\d{{3}})+(?!\d)|\d+)(?:{point}(?P<frac>\d+))?(?!\d)"
    )


def _foreign_number(m: re.Match[str], language: str) -> str:
    """Words for a number written the way ``language`` writes numbers."""
    join = "" if language == "ja" else " "

    def words(digits: str) -> str:
        return num2words(int(digits), lang=language).replace(",", "")

    whole = re.sub(r"\D", "", m["whole"])
    if len(whole) > 15 or (len(whole) > 1 and whole[0] == "0"):
        spoken = join.join(words(d) for d in whole)  # ids, codes: digit by digit
    else:
        spoken = words(whole)
    if m["frac"]:
        spoken += join + _POINT[language] + join + join.join(words(d) for d in m["frac"])
    return (_MINUS[language] + join if m["neg"] else "") + spoken


def _normalize_foreign(text: str, language: str) -> str:
    """Markdown stripped, numbers in ``language``'s words (where num2words has it), cleaned."""
    text = _apply(_MARKDOWN, text)
    if language in NUMBER_LANGUAGES:
        text = _number_pattern(language).sub(lambda m: _foreign_number(m, language), text)
    text = text.translate(_UNICODE)
    if language == "el":  # the Greek question mark is ";": kept from the clause clean-up
        return _apply(_CLEANUP, text.replace(";", _GREEK_QUESTION)).replace(_GREEK_QUESTION, ";")
    return _apply(_CLEANUP, text)


def spoken_length(text: str) -> float:
    """Characters of ``text`` weighted by how long they take to say, in Latin letters.

    A CJK ideograph counts 3 (a syllable; Chinese is read at 4-5 a second where English is
    read at 13-16 letters), kana and Hangul syllables 2; every other character 1.
    """
    length = 0.0
    for char in text:
        code = ord(char)
        if 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF:
            length += 3
        elif 0x3040 <= code <= 0x30FF or 0xAC00 <= code <= 0xD7A3:
            length += 2
        else:
            length += 1
    return length


# --------------------------------------------------------------------------- rule handlers


def _currency(m: re.Match[str]) -> str:
    one, many, cent, cents = _CURRENCIES[m["sym"]]
    whole, frac, scale = m["whole"].replace(",", ""), m["frac"] or "", m["scale"]
    sign = "minus " if m["neg"] else ""
    if scale:
        scale = _SCALES.get(scale.strip().lower(), scale.strip().lower())
        return f"{sign}{_number(whole + ('.' + frac if frac else ''))} {scale} {many}"
    if len(frac) > 2:
        return f"{sign}{_number(whole + '.' + frac)} {many}"
    units, hundredths = int(whole), int(frac.ljust(2, "0")) if frac else 0
    parts = (
        [] if units == 0 and hundredths else [f"{_cardinal(whole)} {one if units == 1 else many}"]
    )
    if hundredths:
        parts.append(f"{_cardinal(str(hundredths))} {cent if hundredths == 1 else cents}")
    return sign + " and ".join(parts)


def _time(m: re.Match[str]) -> str:
    hour, minute, ampm = int(m["h"]), m["m"], m["ap"]
    words = _cardinal(str(hour))
    if minute == "00" and not ampm:
        words += " hundred" if hour == 0 or hour > 12 else " o'clock"
    elif not minute or minute == "00":
        pass  # "3 pm", "3:00 pm"
    elif minute[0] == "0":
        words += " oh " + _DIGIT_WORDS[int(minute[1])]
    else:
        words += " " + _cardinal(minute)
    if m["s"]:
        words += f" and {_cardinal(str(int(m['s'])))} seconds"
    if ampm:
        words += " A M" if ampm in "aA" else " P M"
    return words


def _date(m: re.Match[str]) -> str:
    if m["iso"]:
        month, day, year = _MONTHS[int(m["im"]) - 1], m["id"], m["iso"]
    else:
        month = next(x for x in _MONTHS if x.lower().startswith(m["mon"][:3].lower()))
        day, year = m["day"], m["year"]
    if not 1 <= int(day) <= 31:
        return m[0]
    return f"{month} {_ordinal(day)}" + (f", {_year(year)}" if year else "")


def _abbreviation(m: re.Match[str]) -> str:
    word = m["abbr"]
    if word == "St":  # "Main St." / "5th St." is a street, "St. Louis" a saint
        before = m.string[: m.start()].rstrip().rsplit(" ", 1)[-1]
        word = "Street" if before[:1].isupper() or before[:1].isdigit() else "Saint"
    else:
        word = _ABBREVIATIONS[word]
    return word + ("." if m["end"] is not None else "")


def _url(m: re.Match[str]) -> str:
    url = m[0]
    tail = url[len(url.rstrip(".,;:!?)]'\"")) :]
    url = re.sub(r"^https?://", "", url[: len(url) - len(tail)], flags=re.I)
    url = re.split(r"[?#]", url, maxsplit=1)[0].rstrip("/")
    host, _, path = url.partition("/")
    spoken = " dot ".join(host.split("."))
    if path:
        spoken += " slash " + " slash ".join(path.split("/"))
    spoken = spoken.replace("-", " dash ").replace("_", " underscore ")
    return re.sub(r"\bwww\b", "w w w", spoken, flags=re.I) + tail


def _email(m: re.Match[str]) -> str:
    local, domain = m[0].split("@", 1)
    for sym, word in ((".", " dot "), ("_", " underscore "), ("-", " dash "), ("+", " plus ")):
        local = local.replace(sym, word)
    return f"{local} at {' dot '.join(domain.split('.'))}"


def _phone(m: re.Match[str]) -> str:
    groups = ", ".join(_digits(g) for g in re.findall(r"\d+", m[0]))
    return ("plus " if m[0].startswith("+") else "") + groups


def _fraction(m: re.Match[str]) -> str:
    top, bottom = int(m[1]), int(m[2])
    if top >= bottom:
        return f"{m[1]} slash {m[2]}"
    name = {2: "half", 4: "quarter"}.get(bottom) or _ordinal(m[2])
    return f"{_cardinal(m[1])} {name if top == 1 else _plural_words(name).replace('fs', 'ves')}"


def _unit(m: re.Match[str]) -> str:
    one, many = _UNITS[m["unit"]]
    return f"{m['num']} {one if m['num'] == '1' else many}"


def _decade(m: re.Match[str]) -> str:
    decade = m[1]
    return _plural_words(_year(decade) if len(decade) == 4 else _cardinal(decade))


# --------------------------------------------------------------------------- rules, in order

_Rule = tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]
_MONTH_RE = (
    r"Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?"
)
_AMPM = r"(?P<ap>[AaPp])\.?[Mm](?:\.(?![\"')\]]*\s*$))?(?![A-Za-z])"
_UNICODE = str.maketrans(
    {"‘": "'", "’": "'", "‚": "'", "‛": "'", "“": '"', "”": '"', "„": '"', "«": '"', "»": '"',
     "\u00a0": " ", "\u2009": " ", "\u202f": " ", "−": "-", "\u2010": "-", "\u2011": "-",
     "…": "...", "\r": ""}
)  # fmt: skip


def _rules(*pairs: tuple[str, str | Callable[[re.Match[str]], str], int]) -> list[_Rule]:
    return [(re.compile(pattern, flags), repl) for pattern, repl, flags in pairs]


_M = re.MULTILINE
_MARKDOWN = _rules(
    (r"^\s*(```|~~~).*$", "", _M),  # code fences
    (r"!?\[([^\]]*)\]\([^)]*\)", r"\1", 0),  # links and images: keep the text
    (r"^\s*#{1,6}\s+", "", _M),  # headers
    (r"^\s*>+\s?", "", _M),  # block quotes
    (r"^\s*([-*_])(?:\s*\1){2,}\s*$", "", _M),  # horizontal rules
    (r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+", "", _M),  # bullets and numbered items
    (r"(\*\*|__|~~)(?=\S)(.+?)(?<=\S)\1", r"\2", 0),  # bold, strikethrough
    (r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])", r"\1", 0),  # italics
    (r"(?<!\w)_(?=\S)([^_\n]+?)(?<=\S)_(?!\w)", r"\1", 0),
    (r"`+([^`]*)`+", r"\1", 0),  # code spans
)
_RULES = _rules(
    # dashes: number ranges are read "to", other dashes are pauses
    (r"(?<=\d)\s*[–—]\s*(?=[-$€£¥]?\d)", " to ", 0),
    (r"\s*[—–]+\s*|\s+-{1,2}\s+|(?<=\w)--(?=\w)", ", ", 0),
    (r"[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+", _email, 0),
    (
        r"\b(?:https?://|www\.)[^\s<>\"']+|\b(?:[A-Za-z0-9-]+\.)+"
        r"(?:com|org|net|io|ai|dev|edu|gov|co|uk|de|fr|app|info)\b(?:/[^\s<>\"']*)?",
        _url,
        0,
    ),
    (
        r"(?<![\w+])(?:\+\d{1,3}[\s.-]?|1[\s.-])?(?:\(\d{2,4}\)\s?|\d{2,4}[\s.-])\d{3,4}[\s.-]\d{3,4}(?!\w)"
        r"|(?<![\w+-])\d{3}-\d{4}(?![\w-])",
        _phone,
        0,
    ),
    (
        rf"\b(?P<iso>\d{{4}})-(?P<im>0[1-9]|1[0-2])-(?P<id>[0-2]\d|3[01])\b"
        rf"|\b(?P<mon>{_MONTH_RE})\.?\s+(?P<day>\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(?P<year>\d{{4}})\b)?",
        _date,
        0,
    ),
    (r"(?<![\w.,:-])(\d+(?:\.\d+)?)-(?=[$€£¥]?\d+(?:\.\d+)?(?![\w:-]))", r"\1 to ", 0),
    (
        r"(?P<neg>-)?(?P<sym>[$€£¥])\s?(?P<whole>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d+))?"
        r"(?P<scale>\s(?:thousand|million|billion|trillion|bn)\b|(?:k|K|m|M|bn|B)\b)?",
        _currency,
        0,
    ),
    (r"(\d+)\s?¢", lambda m: f"{_cardinal(m[1])} cent{'' if m[1] == '1' else 's'}", 0),
    (r"(-?\d+(?:,\d{3})*(?:\.\d+)?)\s?%", lambda m: _number(m[1]) + " percent", 0),
    (
        r"(-?\d+(?:\.\d+)?)\s?°\s?([CF])\b",
        lambda m: f"{_number(m[1])} degrees {'Celsius' if m[2] == 'C' else 'Fahrenheit'}",
        0,
    ),
    (
        r"(?<![\d:.,])(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)(?::(?P<s>[0-5]\d))?(?![\d:])"
        rf"(?:\s?{_AMPM})?",
        _time,
        0,
    ),
    (rf"(?<![\d:.,])(?P<h>1[0-2]|0?[1-9])(?P<m>)(?P<s>)\s?{_AMPM}", _time, 0),
    (r"(?<![\d:.,])(\d+):(\d+)(?![\d:])", r"\1 to \2", 0),  # ratios and scores: "16:9"
    (r"(?<![\w.,])(\d{1,3}(?:,\d{3})+|\d+)(?:st|nd|rd|th)\b", lambda m: _ordinal(m[1]), re.I),
    (
        r"(?<![\w.])(?P<abbr>Mrs|Mr|Ms|Dr|Prof|Jr|Sr|Mt|St|vs|etc|e\.g|i\.e|approx|cf|Dept)\."
        r"(?P<end>(?=[\"')\]]*\s*$))?",
        _abbreviation,
        0,
    ),
    (r"\bvs\b", "versus", 0),
    (r"\b[Nn]o\.\s*(?=\d)", "number ", 0),
    (
        r"(?<![\w.])((?:[A-Z]\.){2,})(?P<end>(?=[\"')\]]*\s*$))?",
        lambda m: " ".join(m[1].replace(".", "")) + ("." if m["end"] is not None else ""),
        0,
    ),
    (r"\b(1[1-9]\d0|20\d0|[2-9]0)'?s\b", _decade, 0),
    (
        rf"\b((?:in|since|by|from|until|till|to|through|during|before|after|circa|around|"
        rf"year|early|late|mid|{_MONTH_RE})[\s-]+)(1[1-9]\d\d|20\d\d)(?![\w%]|[.,]\d)",
        lambda m: m[1] + _year(m[2]),
        re.I,
    ),
    (r"(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])", " ", 0),  # "H100" -> "H 100"
    (rf"(?P<num>\d+(?:\.\d+)?)\s?(?P<unit>{'|'.join(map(re.escape, _UNITS))})(?![\w/])", _unit, 0),
    (r"\s*&\s*", " and ", 0),
    (r"#\s*(?=\d)", "number ", 0),
    (r"(?<=\d)\s*\+\s*(?=\d)|\s*\+\s*", " plus ", 0),
    (r"\s*=\s*", " equals ", 0),
    (r"(?<=\d)\s*[×*]\s*(?=\d)", " times ", 0),
    (r"~\s*(?=\d)", "about ", 0),
    (r"\b24/7\b", "twenty-four seven", 0),
    (r"(?<![\d/])([1-9])/([2-9]|1[0-6])(?![\d/])", _fraction, 0),
    (r"(?<=\d)/(?=\d)", " slash ", 0),
    (r"\s*/\s*(?=(?:second|minute|hour|day|week|month|year|person|unit)s?\b)", " per ", 0),
    (r"(?<=[A-Za-z])/(?=[A-Za-z])", " ", 0),  # "and/or"
    (r"\s*@\s*", " at ", 0),
    (r"°", " degrees", 0),
    (r"%", " percent", 0),
    (r"\b\d+(?:\.\d+){2,}\b", lambda m: " point ".join(map(_cardinal, m[0].split("."))), 0),
    (r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)", lambda m: _number(m[0]), 0),
    (r"\d+", lambda m: _cardinal(m[0]), 0),  # digits glued to something odd
)
_CLEANUP = _rules(
    (r"\s*[()\[\]{}|]+\s*", ", ", 0),  # brackets and table bars: pauses
    (r"[*_#^\\<>`~]+", " ", 0),  # markup leftovers
    (r"\.{4,}", "...", 0),
    (r"([!?])[!?.]+", r"\1", 0),
    (r"\s+", " ", 0),
    (r"\s+(?=[,.;:!?])", "", 0),
    (r"[,;:]+(?=[.!?,;:])", "", 0),
    (r"(?<=[,;:])(?=[A-Za-z])", " ", 0),
    (r"^[\s,;:]+", "", 0),
    (r"[\s,;:-]*[,;:][\s-]*$", ",", 0),  # a clause keeps its pause: "Well, then," not "then."
    (r"[\s-]+$", "", 0),
)
_WORDY = re.compile(r"[^\W_]")


def _apply(rules: list[_Rule], text: str) -> str:
    for pattern, repl in rules:
        text = pattern.sub(repl, text)
    return text


_TAG_BASE = 0xE000  # private-use characters hold kept tags' places while the rules run


@lru_cache(maxsize=16)
def _tag_pattern(tags: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(t) for t in sorted(tags, key=len, reverse=True))
    return re.compile(alternatives, re.I)


def normalize_text(text: str, keep_tags: tuple[str, ...] = (), language: str = "en") -> str:
    """Spell out what TTS engines read badly.

    Numbers (thousands separators, decimals, negatives, ordinals, years, ranges), currency,
    percentages, temperatures, times, dates, phone numbers (digit by digit, grouped), e-mail
    addresses and URLs, common abbreviations and symbols become words; markdown markup is
    stripped; curly quotes, dashes and ellipses become ASCII; whitespace is collapsed. Number
    words come from ``num2words`` without its commas ("3,497" -> "three thousand four hundred and
    ninety-seven"), so no pause is read inside a number.

    Args:
        text: Raw text of one segment (see :class:`TextSegmenter`; normalising before
            segmenting would let a segment boundary fall inside a spelled-out number).
        keep_tags: Paralinguistic tags the model performs (Turbo's ``[laugh]``, ``[sigh]``,
            ...): passed through untouched (matched case-insensitively, written as given here)
            instead of being read as bracketed text.
        language: ISO 639-1 code of the text. Every rule above is English; another language
            gets markdown stripping, punctuation clean-up and its numbers in its own words
            (num2words, where it has the language); see the module doc.

    Returns:
        The text to synthesise; empty if nothing speakable is left.
    """
    kept: list[str] = []
    if keep_tags:
        canonical = {t.lower(): t for t in keep_tags}

        def hold(m: re.Match[str]) -> str:
            kept.append(canonical[m[0].lower()])
            return f" {chr(_TAG_BASE + len(kept) - 1)} "

        text = _tag_pattern(tuple(keep_tags)).sub(hold, text)
    if language == "en":
        text = _apply(_MARKDOWN, text.translate(_UNICODE))
        text = _apply(_CLEANUP, _apply(_RULES, text))
    else:
        text = _normalize_foreign(text, language)
    for i, tag in enumerate(kept):
        text = text.replace(chr(_TAG_BASE + i), tag)
    return text


# --------------------------------------------------------------------------- segmentation

_normalize = lru_cache(maxsize=256)(normalize_text)  # a segment is measured, then emitted

_CLOSERS = "\"'”’)\\]»」』）》】"
_BOUNDARY = re.compile(rf"(?:[.!?…]+|[。！？]+|[।॥؟۔]+)[{_CLOSERS}]*|\n")
_GREEK_BOUNDARY = re.compile(rf"(?:[.!?…;]+|[।॥؟۔]+)[{_CLOSERS}]*|\n")  # ";" asks
_UNSPACED_ENDS = "。！？"  # CJK text puts no space after a sentence
_CLAUSE = re.compile(r"[,;:][\"'”’)\]]*(?=\s)|(?<!\d)[—–](?=\D)|\s--?(?=\s)|[，、；：]|[،؛](?=\s)")
_MARKER = re.compile(r"[ \t]*(?:#{1,6}|[-*+•>]|\d{1,3}[.)])(?:\s|$)")
_BLANKS, _WORD = re.compile(r"[ \t]*"), re.compile(r"\S*")
_DOTTED = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")
_PROTECT = re.compile(  # multi-word spans a word-level cut must not split
    r"[$€£¥]\s?\d[\d,.]*\s(?:thousand|million|billion|trillion|bn)\b"
    r"|\d[\d:.]*\s?[AaPp]\.?[Mm]\b\.?|\d[\d,.]*\s?(?:%|°|[A-Za-z]{1,3}\b)"
    r"|\+?\(?\d[\d()]*(?:[\s.-]\(?\d[\d()]*){2,}"
    r"|(?:Mrs?|Ms|Dr|Prof|St|Mt|No)\.\s+\S+|\b(?:" + _MONTH_RE + r")\.?\s+\d+"
)
_NEVER_SPLIT = {"mr", "mrs", "ms", "dr", "prof", "mt", "vs", "v", "e.g", "i.e", "approx", "cf"}
_SPLIT_IF_CAPITAL = {"etc", "a.m", "p.m", "no", "fig", "jr", "sr", "inc", "ltd", "co", "dept", "st"}
_SPLIT_IF_CAPITAL |= {m.lower()[:3] for m in _MONTHS} | {"sept"}
_LOOKAHEAD_MARGIN = 100  # normalised chars past max_chars before an endless sentence is cut
_RECHECK_CHARS = 16  # raw chars an open sentence grows by between two length checks
_SPAN_TAIL = 16  # raw chars that must follow a word boundary before a stream may cut there
_SPLIT, _SKIP, _MORE = "split", "skip", "more"


@dataclass(frozen=True)
class SourceSpan:
    """A cut of a context's raw text and the segments it became.

    Parameters:
        start: Offset of ``text`` in the context's text (the pieces pushed, concatenated, with
            carriage returns removed).
        text: The raw text that was cut, as the client sent it.
        segments: Its normalised segments, in order: usually one; several when it spelled
            out longer than the engine's limit; none when nothing speakable was left.
    """

    start: int
    text: str
    segments: tuple[str, ...]


class TextSegmenter:
    """Incremental splitter for one context's text.

    Text arrives in pieces (whole texts, sentences or LLM tokens) and is concatenated verbatim.
    A sentence ends at ``. ! ? …`` (plus closing quotes or brackets) followed by whitespace, at a
    blank line, or at a newline next to a markdown header or list item. Decimals, "e.g. this",
    "Dr. Smith", "U.S. Army", initials and list numbers do not end a sentence, and a terminator
    at the end of the buffered text waits for what comes next (``push("Hello.")`` yields nothing,
    ``push("Hello. ")`` yields ``["Hello."]``). The first segment of a context is cut early, at
    the first clause boundary (``, ; : —``) where it is at least ``first_clause_min_chars``
    long. A sentence longer than ``max_chars`` is cut greedily at clause boundaries, else at
    word boundaries (never inside a number, time or amount). Only a single token that alone
    spells out longer than ``max_chars`` is split after normalising (its words wrapped, a word
    longer than ``max_chars`` cut inside). Lengths are measured on normalised text; segments
    are normalised, at most ``max_chars`` long, and never empty (one with no letter or digit,
    such as a lone ".", is dropped). Feeding a text in any pieces yields the same segments as
    feeding it whole (up to where normalisation of a half-arrived word is longer than that of
    the whole word by more than 100 characters, which does not happen in practice).
    """

    def __init__(
        self,
        max_chars: int = 300,
        first_clause_min_chars: int = 20,
        keep_tags: tuple[str, ...] = (),
        language: str = "en",
    ):
        """Initialize the segmenter.

        Args:
            max_chars: Longest segment, in normalised characters (the engine's limit); >= 20.
            first_clause_min_chars: Shortest first clause (normalised characters) worth cutting
                early; a value above ``max_chars`` turns the early cut off.
            keep_tags: Paralinguistic tags passed through untouched (see
                :func:`normalize_text`).
            language: ISO 639-1 code of the text: its sentence ends and number words (see
                the module doc). In zh, ja and ko, ``max_chars`` is divided by the characters
                a syllable takes in Latin text (3, 2, 2; at least 20 remain).

        Raises:
            ValueError: If ``max_chars`` is below 20 or ``first_clause_min_chars`` is negative.
        """
        if max_chars < 20 or first_clause_min_chars < 0:
            raise ValueError("max_chars must be >= 20 and first_clause_min_chars >= 0")
        self.language = language
        self.max_chars = max(20, max_chars // _CHARS_PER_SYLLABLE.get(language, 1))
        self.keep_tags = tuple(keep_tags)
        self._boundary = _GREEK_BOUNDARY if language == "el" else _BOUNDARY
        self.first_clause_min_chars = first_clause_min_chars
        self._buf = ""
        self._consumed = 0  # offset of the buffer's start in the context's text
        self._first = True
        self._checked = 0  # buffer length at the last length check of an open sentence

    def push(self, text: str) -> list[str]:
        """Add text; return the segments that are complete now."""
        return [segment for span in self.push_sources(text) for segment in span.segments]

    def flush(self) -> list[str]:
        """Return every remaining segment (end of the context, or an explicit flush)."""
        return [segment for span in self.flush_sources() for segment in span.segments]

    def push_sources(self, text: str) -> list[SourceSpan]:
        """Add text; return the cuts complete now, each with its raw text and segments.

        The same cuts as :meth:`push`, for a caller that maps segments back to the text
        the client sent (word timestamps). Every non-blank character of the context's text
        falls in exactly one returned span, in order, including text nothing speakable came
        of (its span has no segments).
        """
        self._buf += text.replace("\r", "")  # CRLF, even split across pushes, is "\n"
        return self._drain(final=False)

    def flush_sources(self) -> list[SourceSpan]:
        """Return every remaining cut (see :meth:`push_sources` and :meth:`flush`)."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[SourceSpan]:
        out: list[SourceSpan] = []
        while self._buf.strip():
            stripped = self._buf.lstrip()
            self._consumed += len(self._buf) - len(stripped)
            self._buf = stripped
            cut = self._next_cut(final)
            if cut is None:
                break
            raw, self._buf = self._buf[:cut], self._buf[cut:]
            segment = _normalize(raw, self.keep_tags, self.language)
            self._checked = 0
            pieces = _wrap(segment, self.max_chars) if len(segment) > self.max_chars else [segment]
            pieces = [piece for piece in pieces if _WORDY.search(piece)]
            out.append(SourceSpan(self._consumed, raw, tuple(pieces)))
            self._consumed += cut
            self._first = self._first and not pieces
        return out

    def _fits(self, text: str, slack: int = 0) -> bool:
        if len(text) > 8 * (self.max_chars + slack):  # far too long whatever it expands to
            return False
        return len(_normalize(text, self.keep_tags, self.language)) <= self.max_chars + slack

    def _next_cut(self, final: bool) -> int | None:
        """End of the next segment in the buffer, or None while more text is needed."""
        buf, end, limit = self._buf, None, len(self._buf)
        for m in self._boundary.finditer(buf):
            decision = _decide(buf, m, final)
            if decision == _SPLIT:
                end = m.start() if m[0] == "\n" else m.end()
                break
            if decision == _MORE:
                limit = m.start()
                break
        complete = end is not None or final
        limit = end if end is not None else limit
        if self._first:
            for m in _CLAUSE.finditer(buf):
                if m.end() >= limit:
                    break
                size = len(_normalize(buf[: m.end()], self.keep_tags, self.language))
                if size >= self.first_clause_min_chars:
                    if size <= self.max_chars:
                        return m.end()
                    break
        if not complete:  # an open sentence: cut only once it is surely too long
            if limit < self._checked + _RECHECK_CHARS:
                return None  # checked a moment ago; normalising on every token costs too much
            self._checked = limit
        if self._fits(buf[:limit], 0 if complete else _LOOKAHEAD_MARGIN):
            return limit if complete else None
        return self._long_cut(buf[:limit], complete)

    def _long_cut(self, text: str, complete: bool) -> int | None:
        """Greedy cut of a too-long sentence at clause boundaries, else at word boundaries.

        When not even one clause or word fits, the cut is after the first word (an amount or
        a token that alone spells out longer than ``max_chars``); ``_drain`` then wraps its
        normalised words.
        """
        window = 8 * self.max_chars
        whole, text = text, text[:window]
        best = first = 0
        for m in _CLAUSE.finditer(text):
            if not self._fits(text[: m.end()]):
                break
            best = m.end()
        if best:
            return best
        protected = [m.span() for m in _PROTECT.finditer(text)]
        for m in re.finditer(r"\s+", text):
            if m.start() == 0 or any(a < m.start() < b for a, b in protected):
                continue
            if not complete and m.end() > len(whole) - _SPAN_TAIL:
                return None  # a protected span ("$1.2 million") may still be arriving
            first = first or m.start()
            if not self._fits(text[: m.start()]):
                break
            best = m.start()
        if best or first:
            return best or first
        if len(whole) > window:  # one huge token: cut it the same way however it arrives
            return window
        return len(whole) if complete else None


def _decide(buf: str, m: re.Match[str], final: bool) -> str:
    """Whether the terminator or newline at ``m`` ends a sentence (or more text is needed)."""
    end = m.end()
    if m[0] == "\n":
        nxt = _BLANKS.match(buf, end).end()
        if nxt == len(buf):
            return _SPLIT if final else _MORE
        line_start = buf.rfind("\n", 0, m.start()) + 1
        if buf[nxt] == "\n" or _MARKER.match(buf, line_start):
            return _SPLIT
        word_end = _WORD.match(buf, nxt).end()
        if word_end == len(buf) and not final:
            return _MORE
        return _SPLIT if _MARKER.match(buf, nxt) else _SKIP
    if end == len(buf):
        return _SPLIT if final else _MORE
    if m[0][0] in _UNSPACED_ENDS:
        return _SPLIT
    if not buf[end].isspace():
        return _SKIP  # "3.5", "e.g.", "example.com"
    if m[0] != ".":
        return _SPLIT
    start = m.start()
    word_start = max(buf.rfind(" ", 0, start), buf.rfind("\n", 0, start), buf.rfind("\t", 0, start))
    token = buf[word_start + 1 : start].lstrip("([\"'")
    low = token.lower()
    if low in _NEVER_SPLIT or (token == "St" and not _street(buf, word_start)):
        return _SKIP
    if (len(token) == 1 and token.isupper()) or (
        _DOTTED.fullmatch(token) and low not in {"a.m", "p.m"}
    ):
        return _SKIP  # initials, "U.S. Army"
    before = buf[: word_start + 1].rstrip(" \t")
    if token.isdigit() and (not before or before.endswith("\n")):
        return _SKIP  # "1. " starting a line is a list number
    if low in _SPLIT_IF_CAPITAL:
        nxt = len(buf) - len(buf[end:].lstrip())
        if nxt == len(buf):
            return _SPLIT if final else _MORE
        return _SPLIT if buf[nxt].isupper() else _SKIP
    return _SPLIT


def _street(buf: str, word_start: int) -> bool:
    before = buf[: max(word_start, 0)].rstrip().rsplit(None, 1)
    return bool(before) and (before[-1][:1].isupper() or before[-1][:1].isdigit())


def _wrap(text: str, max_chars: int) -> list[str]:
    """Greedy word wrap of normalised text; only a word longer than ``max_chars`` is cut."""
    lines: list[str] = []
    for word in text.split():
        while len(word) > max_chars:
            lines.append(word[:max_chars])
            word = word[max_chars:]
        if lines and len(lines[-1]) + 1 + len(word) <= max_chars:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def split_text(
    text: str,
    max_chars: int = 300,
    first_clause_min_chars: int = 20,
    keep_tags: tuple[str, ...] = (),
    language: str = "en",
) -> list[str]:
    """Segment and normalise a whole text at once (``push`` then ``flush``).

    Args:
        text: The text.
        max_chars: Longest segment, in normalised characters.
        first_clause_min_chars: See :class:`TextSegmenter`.
        keep_tags: Paralinguistic tags passed through untouched.
        language: ISO 639-1 code of the text (see :class:`TextSegmenter`).

    Returns:
        The normalised segments, in order.
    """
    segmenter = TextSegmenter(max_chars, first_clause_min_chars, keep_tags, language)
    return segmenter.push(text) + segmenter.flush()
