"""Word timestamps end to end: a real piper sidecar, a real websockets client, Whisper as judge.

Protocol: ``docs/protocol.md`` (Word timestamps). The piper engine times words from its voice's
phoneme durations; Whisper tiny.en's own word timestamps are the independent reference.
"""

from __future__ import annotations

import difflib

import numpy as np
import pytest

from tests.asr import normalize_words, transcribe_words
from tests.client import TTSClient

RATE = 16000
TOLERANCE_S = 0.15
SENTENCES = [
    "Thank you for calling the city library. Our opening hours are nine to five, "
    "Monday through Friday.",
    "Please call me back tomorrow morning about the unpaid invoice of the company.",
]
PIECES = [
    "It costs $5 million",
    " — no, I think—actually ",
    "it's fine. Call (555) 123-4567 today! 🙂",
]


def timestamps_of(client: TTSClient, context_id: str) -> list[dict]:
    return [
        m
        for m in client.messages
        if isinstance(m, dict) and m["type"] == "timestamps" and m["context_id"] == context_id
    ]


def timed_words(client: TTSClient, context_id: str) -> list[tuple[str, float, float]]:
    out = []
    for m in timestamps_of(client, context_id):
        assert len(m["words"]) == len(m["start"]) == len(m["end"]) > 0
        out += list(zip(m["words"], m["start"], m["end"], strict=True))
    return out


def key(word: str) -> str:
    return normalize_words(word).replace(" ", "")


@pytest.mark.parametrize("text", SENTENCES)
async def test_word_starts_agree_with_whisper(sidecar, text):
    async with await TTSClient.connect(sidecar.url) as client:
        result = await client.synthesize(
            text, context_id="w", word_timestamps=True, sample_rate=RATE, encoding="pcm_f32le"
        )
        ours = timed_words(client, "w")
    assert result.started["word_timestamps"] is True
    assert [w for w, _, _ in ours] == text.split()

    heard = transcribe_words(result.audio(), RATE)
    matcher = difflib.SequenceMatcher(
        a=[key(w) for w, _, _ in ours], b=[key(w) for w, _, _ in heard], autojunk=False
    )
    pairs = [
        (ours[block.a + k], heard[block.b + k])
        for block in matcher.get_matching_blocks()
        for k in range(block.size)
    ]
    assert len(pairs) >= 0.8 * len(ours), (ours, heard)
    errors = [abs(o[1] - h[1]) for o, h in pairs]
    close = sum(e <= TOLERANCE_S for e in errors)
    report = [(o[0], o[1], round(h[1], 2)) for o, h in pairs]
    assert close >= 0.8 * len(pairs), report
    assert float(np.median(errors)) <= 0.1, report


async def test_timestamps_come_before_their_audio_and_name_each_word_once(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        for piece in PIECES:
            await client.send(
                {
                    "type": "synthesize",
                    "context_id": "t",
                    "text": piece,
                    "continue": True,
                    "word_timestamps": True,
                    "sample_rate": RATE,
                    "encoding": "pcm_s16le",
                }
            )
        await client.send({"type": "flush", "context_id": "t"})
        result = (await client.collect(1))["t"]
        messages = list(client.messages)
    assert result.end["type"] == "done"

    # On the wire: started, then timestamps and audio interleaved, then done. When each
    # timestamps message arrives, the audio received so far ends before every word it names.
    kinds = [m["type"] if isinstance(m, dict) else "audio" for m in messages[1:]]
    assert kinds[0] == "started" and kinds[-1] == "done" and kinds[1] == "timestamps"
    received_s = 0.0
    for m in messages[1:]:
        if isinstance(m, bytes):
            received_s += len(m) / 2 / RATE
        elif m["type"] == "timestamps":
            assert min(m["start"]) >= received_s - 1 / RATE, (m, received_s)

    words = timed_words(client, "t")
    assert [w for w, _, _ in words] == "".join(PIECES).split()
    starts = [s for _, s, _ in words]
    assert starts == sorted(starts)
    assert all(e >= s for _, s, e in words)
    assert words[-1][1] <= result.end["audio_seconds"] + 0.01
    # "$5" is one word, spoken "five dollars"; the dash and the emoji say nothing.
    by_word = {w: (s, e) for w, s, e in words}
    assert by_word["$5"][1] - by_word["$5"][0] > 0.2
    assert by_word["—"][0] == by_word["—"][1] == by_word["no,"][0]
    end_s = result.end["audio_seconds"]
    assert by_word["🙂"][0] == by_word["🙂"][1] == pytest.approx(end_s, abs=0.01)


async def test_no_timestamps_unless_asked(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        assert client.ready["word_timestamps"] is True
        plain = await client.synthesize("Nothing timed here.", context_id="plain")
        off = await client.synthesize("Nor here.", context_id="off", word_timestamps=False)
        assert timestamps_of(client, "plain") == timestamps_of(client, "off") == []
        bad = await client.request(
            {"type": "synthesize", "text": "Hi.", "context_id": "bad", "word_timestamps": "yes"},
            "error",
        )
    assert plain.started["word_timestamps"] is False and off.started["word_timestamps"] is False
    assert plain.end["type"] == off.end["type"] == "done"
    assert bad["code"] == "invalid_request" and "word_timestamps" in bad["message"]


async def test_cancel_stops_timestamps_too(sidecar):
    text = " ".join(["This long reply keeps the engine busy for a good while."] * 12)
    async with await TTSClient.connect(sidecar.url) as client:
        await client.send(
            {"type": "synthesize", "context_id": "c", "text": text, "word_timestamps": True}
        )
        while not timestamps_of(client, "c"):
            await client.recv()
        await client.send({"type": "cancel", "context_id": "c"})
        result = (await client.collect(1))["c"]
        after = client.messages.index(result.end)
        late = [m for m in client.messages[after:] if isinstance(m, dict)]
        # The connection goes on, with word timestamps for the next context.
        again = await client.synthesize("Still here.", context_id="d", word_timestamps=True)
        assert [w for w, _, _ in timed_words(client, "d")] == ["Still", "here."]
    assert result.end["type"] == "cancelled"
    assert [m for m in late if m.get("context_id") == "c" and m is not result.end] == []
    assert again.end["type"] == "done"


async def test_http_refuses_word_timestamps(sidecar):
    import aiohttp

    http = sidecar.url.replace("ws://", "http://").replace("/v1/stream/tts", "/v1/synthesize")
    async with aiohttp.ClientSession() as session:
        async with session.post(http, json={"text": "Hi.", "word_timestamps": True}) as r:
            body = await r.json()
            assert r.status == 400 and "word_timestamps" in body["message"]
        async with session.post(http, json={"text": "Hi.", "word_timestamps": False}) as r:
            assert r.status == 200
