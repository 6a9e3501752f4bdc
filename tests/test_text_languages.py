"""The text splitter and normaliser in the multilingual model's languages: sentence ends of
each script, numbers in the language's own words (num2words), other text left alone."""

from __future__ import annotations

import pytest
from chatterbox_sidecar.engines.chatterbox.model_files import speech_token_budget
from chatterbox_sidecar.engines.chatterbox.models import MULTILINGUAL_LANGUAGES
from chatterbox_sidecar.text import (
    NUMBER_LANGUAGES,
    TextSegmenter,
    normalize_text,
    split_text,
    spoken_length,
)
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.mark.parametrize(
    "language, text, segments",
    [
        ("zh", "你好世界。我很好！你呢？", ["你好世界。", "我很好！", "你呢？"]),
        ("ja", "今日は晴れです。明日は「雨」！", ["今日は晴れです。", "明日は「雨」！"]),
        ("hi", "मेरा नाम राम है। आप कैसे हैं?", ["मेरा नाम राम है।", "आप कैसे हैं?"]),
        ("ar", "كيف حالك؟ أنا بخير.", ["كيف حالك؟", "أنا بخير."]),
        ("el", "Τι κάνεις; Καλά, ευχαριστώ.", ["Τι κάνεις;", "Καλά, ευχαριστώ."]),
        ("es", "¿Qué tal? Muy bien.", ["¿Qué tal?", "Muy bien."]),
    ],
)
def test_sentence_ends_of_each_script(language, text, segments):
    assert split_text(text, language=language) == segments
    # fed a character at a time (as LLM tokens come), the same segments
    segmenter = TextSegmenter(language=language)
    pieces = [s for char in text for s in segmenter.push(char)] + segmenter.flush()
    assert pieces == segments


def test_a_greek_question_mark_is_a_semicolon_elsewhere():
    text = "Ένα; Δύο; Τρία."
    assert split_text(text, language="el") == ["Ένα;", "Δύο;", "Τρία."]
    # in other languages ";" is a pause inside a sentence
    assert split_text("One; two; three.", language="en") == ["One; two; three."]


def test_a_cjk_end_waits_for_a_closing_quote():
    segmenter = TextSegmenter(language="zh")
    assert segmenter.push("他说：“你好。") == []
    assert segmenter.push("”他走了。") == ['他说："你好。"']  # curly quotes become ASCII
    assert segmenter.flush() == ["他走了。"]


def test_first_segment_is_cut_early_at_a_cjk_clause():
    text = "我们今天要讨论的问题非常重要而且复杂，所以请大家认真听我说完这一段话。"
    segments = split_text(text, first_clause_min_chars=10, language="zh")
    assert segments[0].endswith("，") and "".join(segments) == text


def test_syllabic_scripts_get_shorter_segments():
    assert TextSegmenter(300, language="zh").max_chars == 100
    assert TextSegmenter(300, language="ja").max_chars == 150
    assert TextSegmenter(300, language="ko").max_chars == 150
    assert TextSegmenter(300, language="de").max_chars == 300
    long = "天" * 250  # no punctuation at all: cut anyway
    segments = split_text(long, language="zh")
    assert "".join(segments) == long and max(map(len, segments)) <= 100


@pytest.mark.parametrize(
    "language, text, spoken",
    [
        ("de", "Es kostet 3.497,25 Euro.", "Es kostet dreitausendvierhundertsiebenundneunzig "
         "Komma zwei fünf Euro."),
        ("de", "Bei -12 Grad", "Bei minus zwölf Grad"),
        ("fr", "Il a 1 234 ans.", "Il a mille deux cent trente-quatre ans."),
        ("es", "Tengo 3,5 kilos.", "Tengo tres coma cinco kilos."),
        ("it", "Costa 3,25 euro.", "Costa tre virgola due cinque euro."),
        ("pl", "Mam -5 zł.", "Mam minus pięć zł."),
        ("ru", "Это 21 день.", "Это двадцать один день."),
        ("ja", "今日は2024年です。", "今日は二千二十四年です。"),
        ("ko", "저는 25살입니다.", "저는 이십오살입니다."),
        ("tr", "Saat 7 oldu.", "Saat yedi oldu."),
        ("en", "It costs 3,497.25 euros.", "It costs three thousand four hundred and "
         "ninety-seven point two five euros."),
    ],
)  # fmt: skip
def test_numbers_are_spoken_in_the_language(language, text, spoken):
    assert normalize_text(text, language=language) == spoken


def test_other_languages_get_no_english_words():
    # units, percent, abbreviations and hyphenated names stay as written outside English
    assert normalize_text("5 km und 20 % mehr, Covid-19", language="de") == (
        "fünf km und zwanzig % mehr, Covid-neunzehn"
    )
    assert normalize_text("Dr. Müller kommt um 3 pm", language="de") == (
        "Dr. Müller kommt um drei pm"
    )
    # markdown goes in every language
    assert normalize_text("**Hallo** [Welt](http://x.de)", language="de") == "Hallo Welt"


@pytest.mark.parametrize("language", ["el", "hi", "ms", "sw", "zh"])
def test_digits_stay_where_num2words_lacks_the_language(language):
    assert language not in NUMBER_LANGUAGES
    assert "3" in normalize_text("3 x", language=language)


def test_cjk_characters_take_longer_to_say():
    assert spoken_length("abc") == 3
    assert spoken_length("你好") == 6 and spoken_length("かな") == 4 and spoken_length("한국") == 4
    assert speech_token_budget("你好世界" * 5) > speech_token_budget("abcd" * 5)
    assert speech_token_budget("hello world") == speech_token_budget("HELLO WORLD")


LANGUAGES = sorted(MULTILINGUAL_LANGUAGES)
# Text a client might send: words of several scripts, numbers in every grouping, signs.
_PIECES = st.sampled_from(
    ["Hola", "你好", "こんにちは", "नमस्ते", "مرحبا", "Γειά", "Привет", "שלום", "안녕", "ok"]
    + ["1", "-3", "3.497,25", "1 234", "3,497.25", "007", "1234567890123456789", "١٢٣", "１２"]
    + [" ", ". ", "? ", "。", "！", "؟ ", ";", "«", "»", "\u202f", "$", "%", "\n"]
)


@settings(max_examples=300, deadline=None)
@given(
    language=st.sampled_from(LANGUAGES),
    pieces=st.lists(_PIECES | st.text(max_size=8), max_size=40),
    cut=st.integers(0, 200),
)
def test_any_text_in_any_language_is_split_and_normalised(language, pieces, cut):
    text = "".join(pieces)
    normalize_text(text, language=language)
    segmenter = TextSegmenter(max_chars=120, language=language)
    segments = segmenter.push(text[:cut]) + segmenter.push(text[cut:]) + segmenter.flush()
    assert all(len(s) <= 120 for s in segments), segments
    assert all(s.strip() for s in segments), segments
