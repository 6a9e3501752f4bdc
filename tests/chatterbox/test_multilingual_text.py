"""Chatterbox Multilingual's text input: upstream's per-language preparation and the language
token, on the real ``grapheme_mtl_merged_expanded_v1.json`` (shipped in chatterbox-vllm)."""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

import pytest
from chatterbox_sidecar.engines.chatterbox.models import (
    MULTILINGUAL,
    MULTILINGUAL_LANGUAGES,
    ORIGINAL,
    model_spec,
)
from chatterbox_sidecar.engines.chatterbox.multilingual.text import (
    CangjieSpeller,
    MultilingualTokenizer,
    hangul_to_jamo,
    mtl_punc_norm,
)
from chatterbox_sidecar.engines.chatterbox.t3.model import START_TEXT_TOKEN, STOP_TEXT_TOKEN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .mtl_checkpoint import TEXT_VOCAB, TOKENIZER_FILE, write_mtl_tokenizer_files

UNK = 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mtl_tokenizer_files(tmp_path_factory.mktemp("mtl-tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(folder: Path) -> MultilingualTokenizer:
    return MultilingualTokenizer(folder, chinese_segmenter=None)


def vocab(folder: Path) -> dict[str, int]:
    return json.loads((folder / TOKENIZER_FILE).read_text())["model"]["vocab"]


def test_multilingual_spec_follows_upstream():
    spec = model_spec("chatterbox-multilingual")
    assert spec is MULTILINGUAL  # served: its sidecar test starts and speaks it
    assert spec.t3_file == "t3_mtl23ls_v2.safetensors"
    assert "grapheme_mtl_merged_expanded_v1.json" in spec.files
    assert "Cangjie5_TC.json" in spec.files
    assert len(spec.languages) == 23 and spec.default_language == "en"
    # upstream conditions T3 Multilingual exactly as the Original: one conditionals file
    assert spec.conds_file == ORIGINAL.conds_file
    assert spec.repetition_penalty == 1.2 and spec.trim_final_token
    assert not ORIGINAL.trim_final_token and ORIGINAL.default_language == "en"


def test_every_language_is_framed_by_start_its_token_and_stop(folder, tokenizer):
    ids = vocab(folder)
    assert len(tokenizer) == 2454
    offered = set(tokenizer.languages)
    assert offered >= set(MULTILINGUAL_LANGUAGES) - {"ja"}  # ja needs pykakasi
    for language in tokenizer.languages:
        encoded = tokenizer.encode("Hi", language)
        assert encoded[0] == 255 and encoded[-1] == 0
        assert encoded[1] == ids[f"[{language}]"] == tokenizer.language_id(language)
    assert tokenizer.encode("Hi")[1] == ids["[en]"]  # no language: English


def test_text_is_cleaned_lower_cased_and_decomposed(tokenizer):
    # punc_norm (capitalised, full stop added, ':' as ','), then lower case and NFKD
    prepared = tokenizer.prepare("café  déjà vu: oui", "fr")
    expected = "[fr]" + unicodedata.normalize("NFKD", "café déjà vu, oui.")
    assert prepared == expected.replace(" ", "[SPACE]")
    assert UNK not in tokenizer.encode("café déjà vu: oui", "fr")
    # CJK punctuation ends a text: no full stop added
    assert mtl_punc_norm("你好。") == "你好。" and mtl_punc_norm("hello") == "Hello."


def test_chinese_is_spelled_in_cangjie(tokenizer):
    prepared = tokenizer.prepare("你好妳", "zh")
    # 妳 shares 好's code "vnd": its index among the characters of that code follows
    assert prepared == (
        "[zh][cj_o][cj_n][cj_f][cj_.][cj_v][cj_n][cj_d][cj_.][cj_v][cj_n][cj_d][cj_1][cj_.]."
    )
    ids = tokenizer.encode("你好妳", "zh")
    assert UNK not in ids and tokenizer.decode(ids) == "[START]" + prepared + "[STOP]"
    # a character the table lacks stays as written; Latin letters are not spelled
    assert tokenizer.prepare("你猫 ok", "zh").startswith("[zh][cj_o][cj_n][cj_f][cj_.]猫[SPACE]ok")


def test_chinese_words_are_separated_when_a_segmenter_is_given(folder):
    pairs = MultilingualTokenizer(
        folder, chinese_segmenter=lambda text: [text[i : i + 2] for i in range(0, len(text), 2)]
    )
    assert pairs.prepare("你好世界", "zh") == (
        "[zh][cj_o][cj_n][cj_f][cj_.][cj_v][cj_n][cj_d][cj_.][SPACE]"
        "[cj_p][cj_t][cj_.][cj_w][cj_o][cj_l][cj_.][SPACE]."
    )


def test_cangjie_table_format(tmp_path):
    table = tmp_path / "Cangjie5_TC.json"
    table.write_text(json.dumps(["日\ta\textra", "曰\ta", "月\tb"]), encoding="utf-8")
    speller = CangjieSpeller(table)
    assert len(speller) == 3
    assert speller.spell("日") == "[cj_a][cj_.]" and speller.spell("曰") == "[cj_a][cj_1][cj_.]"
    assert speller.spell("x") is None
    table.write_text('{"not": "a list"}')
    with pytest.raises(ValueError):
        CangjieSpeller(table)


def test_korean_syllables_become_conjoining_jamo(tokenizer):
    assert hangul_to_jamo("한국어") == "\u1112\u1161\u11ab\u1100\u116e\u11a8\u110b\u1165"
    assert hangul_to_jamo("한국어 ok") == unicodedata.normalize("NFKD", "한국어 ok")
    prepared = tokenizer.prepare("안녕하세요", "ko")
    assert prepared == "[ko]" + hangul_to_jamo("안녕하세요") + "."
    assert UNK not in tokenizer.encode("안녕하세요", "ko")


@pytest.mark.parametrize(
    "language, text",
    [("hi", "नमस्ते दुनिया"), ("ar", "مرحبا بالعالم"), ("el", "Γειά σου κόσμε"),
     ("ru", "Привет, мир"), ("he", "שלום עולם"), ("de", "Grüße aus Köln")],
)  # fmt: skip
def test_other_scripts_are_known_to_the_vocabulary(tokenizer, language, text):
    ids = tokenizer.encode(text, language)
    assert UNK not in ids
    # Hebrew and Russian go in as written: no niqqud, no stress marks (as upstream's install)
    body = unicodedata.normalize("NFKD", mtl_punc_norm(text).lower())
    assert tokenizer.decode(ids) == f"[START][{language}]{body}[STOP]"


def test_japanese_kanji_become_hiragana(folder):
    pytest.importorskip("pykakasi")
    tokenizer = MultilingualTokenizer(folder, chinese_segmenter=None)
    assert "ja" in tokenizer.languages
    prepared = tokenizer.prepare("東京へ行く", "ja")
    assert unicodedata.normalize("NFC", prepared) == "[ja]とうきょうへいく."
    # a kanji word read with は or へ first gets a space before it, as upstream does
    assert unicodedata.normalize("NFC", tokenizer.prepare("話", "ja")) == "[ja][SPACE]はなし."
    # katakana stays katakana; dakuten come decomposed (NFKD)
    assert unicodedata.normalize("NFC", tokenizer.prepare("カタカナ", "ja")) == "[ja]カタカナ."
    assert "\u3099" in tokenizer.prepare("ご", "ja")
    assert UNK not in tokenizer.encode("今日は良い天気です。", "ja")


def test_japanese_is_not_offered_without_pykakasi(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "pykakasi", None)  # import fails
    tokenizer = MultilingualTokenizer(folder, chinese_segmenter=None)
    assert "ja" not in tokenizer.languages and "pykakasi" in tokenizer.unavailable["ja"]
    assert len(tokenizer.languages) == 22
    with pytest.raises(ValueError, match="pykakasi"):
        tokenizer.encode("東京", "ja")


def test_a_language_the_model_lacks_is_refused(tokenizer):
    with pytest.raises(ValueError, match="'vi' is not available"):
        tokenizer.encode("xin chào", "vi")


def test_a_language_token_missing_from_the_vocabulary_is_not_offered(folder, tmp_path):
    data = json.loads((folder / TOKENIZER_FILE).read_text())
    del data["model"]["vocab"]["[sw]"]
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "[sw]"]
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps(data))
    (tmp_path / "Cangjie5_TC.json").write_bytes((folder / "Cangjie5_TC.json").read_bytes())
    tokenizer = MultilingualTokenizer(tmp_path, chinese_segmenter=None)
    assert "sw" not in tokenizer.languages and "[sw]" in tokenizer.unavailable["sw"]


def test_not_the_multilingual_tokenizer_is_refused(folder, tmp_path):
    data = json.loads((folder / TOKENIZER_FILE).read_text())
    data["model"]["vocab"]["[START]"] = 7
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "[START]"]
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not the Chatterbox multilingual tokenizer"):
        MultilingualTokenizer(tmp_path, chinese_segmenter=None)


@pytest.mark.parametrize(
    ("language", "text"),
    [("es", "¿Dónde está la estación, señor?"), ("de", "Grüße aus München, 42 Mal!")],
)
def test_word_alignment_maps_the_prepared_tokens_back_to_the_words(tokenizer, language, text):
    from chatterbox_sidecar.engines.chatterbox.t3.alignment import text_token_words

    ids = tokenizer.encode(text, language)
    strings = [tokenizer.decode([i]) or "" for i in ids]
    owners = text_token_words([tokenizer._tokenizer.id_to_token(i) for i in ids], text)
    assert owners[0] is None and owners[1] is None  # [START] and the language token
    words = text.split()
    spelled: dict[int, str] = {}
    for token, word in zip(strings, owners, strict=True):
        if word is not None:
            spelled[word] = spelled.get(word, "") + token
    assert sorted(spelled) == list(range(len(words)))  # every word owns its letters, in order
    for n, word in enumerate(words):
        letters = "".join(c for c in unicodedata.normalize("NFKD", word.lower()) if c.isalnum())
        assert "".join(c for c in spelled[n] if c.isalnum()) == letters


def test_respelled_languages_get_no_word_timestamps():
    from chatterbox_sidecar.engines.base import EngineInfo

    assert MULTILINGUAL.untimed_languages == ("ja", "ko", "zh")
    info = EngineInfo(
        name="chatterbox",
        native_sample_rate=24000,
        can_clone=True,
        max_concurrency=1,
        languages=MULTILINGUAL.languages,
        word_timestamps=True,
        untimed_languages=MULTILINGUAL.untimed_languages,
    )
    assert info.times_words("es") and info.times_words("en")
    assert not info.times_words("zh") and not info.times_words("ko")
    assert not EngineInfo("piper", 22050, False, 1).times_words("en")


@pytest.fixture(scope="module")
def kana_tokenizer(folder: Path) -> MultilingualTokenizer:
    pytest.importorskip("pykakasi")
    return MultilingualTokenizer(folder, chinese_segmenter=None)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    language=st.sampled_from(sorted(MULTILINGUAL_LANGUAGES)),
    text=st.text(st.characters(codec="utf-8"), max_size=120),
)
def test_any_text_in_any_language_gives_framed_ids_inside_the_vocabulary(
    kana_tokenizer, language, text
):
    # Whatever a client sends in whatever language (NUL and lone surrogates are refused by the
    # protocol before this), the preparation neither raises nor leaves the text vocabulary.
    ids = kana_tokenizer.encode(text, language)
    assert ids[0] == START_TEXT_TOKEN and ids[-1] == STOP_TEXT_TOKEN
    assert ids[1] == kana_tokenizer.language_id(language)
    assert all(0 <= i < TEXT_VOCAB for i in ids), ids
