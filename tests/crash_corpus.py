"""Texts that crashed espeak-ng (piper's phonemizer) with SIGSEGV, and shapes to fuzz with.

Each entry of ``CRASHERS`` and ``SOMETIMES`` killed the whole sidecar before issue 18 (piper-tts
1.3, espeak-ng in its ``espeakbridge``), through the websocket, ``GET /v1/synthesize`` or both;
they come from the adversarial pass of issue 18 and from probing runs of dotted letters.
``SURVIVORS`` are look-alikes that were spoken. The strategy ``hostile_texts`` builds texts of
the same shapes (repeated abbreviations, dotted initials, URLs, e-mail addresses, digit runs,
mixed scripts, control and combining characters) for fuzzing a live server.
"""

from __future__ import annotations

from hypothesis import strategies as st

# Crashed espeak-ng every time through the sidecar (3 of 3 tries each, after other speech).
CRASHERS = {
    "a_dot_200": "a." * 200,
    "a_dot_300": "a." * 300,
    "b_dot_200": "b." * 200,
    "z_dot_300": "z." * 300,
    "ie_200": "i.e." * 200,
    "letters_dotted": "".join(chr(97 + i % 26) + "." for i in range(200)),
    "a_dot_500": "a." * 500,
    "z_dot_600": "z." * 600,
    "ie_300": "i.e." * 300,
    "ab_dot_150": "a.b." * 150,
}

# Crashed at times (espeak-ng's state decides), or crashed before the text limits and the
# normaliser changed what reaches it: each must end in done, engine_error or a stated limit.
SOMETIMES = {
    "a_dot_100": "a." * 100,
    "a_dot_150": "a." * 150,
    "x_dot_150": "x." * 150,
    "ie_100": "i.e." * 100,
    "url_like": "www." + "a." * 9990 + "com",
    "email_like": "a" * 9000 + "@" + "b." * 5000 + "com",
}

SURVIVORS = {
    "a_dot_50": "a." * 50,
    "initials": "J.R.R. " * 20,
    "usa": "U.S.A. " * 20,
    "eg": "e.g. " * 30,
    "a_dot_space": "a. " * 40,
}

_LETTERS = st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ABBREVIATIONS = st.sampled_from(
    ["a.", "b.", "x.", "i.e.", "e.g.", "U.S.", "A.B.C.", "etc.", "Dr.", "p.m.", "No."]
)
_SCRIPTS = st.sampled_from(["Привет", "你好", "مرحبا", "שלום", "नमस्ते", "こんにちは", "🙂", "Ω"])
_ODD_CHARS = st.sampled_from(
    ["\u0301", "\u0308", "\u200b", "\u200d", "\u202e", "\ufeff", "\t", "\n", "\x07", "\x1b"]
)


@st.composite
def _repeated(draw: st.DrawFn) -> str:
    unit = draw(_ABBREVIATIONS | st.builds(lambda c: c + ".", _LETTERS))
    sep = draw(st.sampled_from(["", "", " ", "-"]))
    return sep.join([unit] * draw(st.integers(20, 250)))


@st.composite
def _url(draw: st.DrawFn) -> str:
    host = ".".join(
        draw(st.lists(st.text(_LETTERS, min_size=1, max_size=3), min_size=5, max_size=150))
    )
    path = "/".join(draw(st.lists(st.text(_LETTERS, max_size=4), max_size=20)))
    return draw(st.sampled_from(["http://", "https://", "www.", ""])) + host + ".com/" + path


@st.composite
def _email(draw: st.DrawFn) -> str:
    local = draw(st.text(_LETTERS, min_size=1, max_size=200))
    domain = ".".join(
        draw(st.lists(st.text(_LETTERS, min_size=1, max_size=2), min_size=2, max_size=200))
    )
    return f"{local}@{domain}.com"


_PIECES = (
    _repeated()
    | _url()
    | _email()
    | st.builds(lambda n: "7" * n, st.integers(50, 300))
    | st.builds(lambda s, n: (s + " ") * n, _SCRIPTS, st.integers(1, 30))
    | st.builds(lambda c, n: ("e" + c) * n, _ODD_CHARS, st.integers(1, 200))
    | st.text(min_size=1, max_size=200)
)

hostile_texts = (
    st.lists(_PIECES, min_size=1, max_size=3)
    .map(" ".join)
    .filter(lambda t: any(ch.isalnum() for ch in t))
)
