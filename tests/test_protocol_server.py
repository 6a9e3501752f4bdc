"""Protocol v1 end to end: a real sidecar (piper engine) and a real websockets client."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.asr import transcribe, word_error_rate
from tests.client import TTSClient

SENTENCE = "The quick brown fox jumps over the lazy dog."
LONG_TEXT = " ".join(
    f"This is sentence number {i} of a long reply that keeps the engine busy for a while."
    for i in range(1, 31)
)


async def test_ready_announces_engine_and_limits(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        ready = client.ready
    assert ready["engine"] == "piper"
    assert ready["sample_rate"] == 24000
    assert ready["native_sample_rate"] == 22050
    assert ready["encodings"] == ["pcm_f32le", "pcm_s16le", "pcm_mulaw"]
    assert "default" in ready["voices"]
    assert ready["limits"]["max_text_chars"] == 20000
    assert ready["limits"]["max_frame_bytes"] == 16 * 1024 * 1024
    assert ready["limits"]["max_contexts_per_connection"] >= 1
    # the model, what it speaks and which generation parameters it applies (piper: none)
    assert ready["model"] and ready["languages"] == ["en"]
    assert ready["parameters"] == [] and ready["tags"] == []


async def test_started_names_the_parameters_the_engine_does_not_apply(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        await client.send({"type": "synthesize", "text": "Hi.", "exaggeration": 0.9})
        started = await client.recv_json()
        await client.collect(1)
    assert started["exaggeration"] == 0.9  # echoed as sent ...
    assert started["not_applied"] == ["exaggeration", "cfg_weight", "temperature", "seed"]


@pytest.mark.parametrize(
    ("encoding", "rate"), [("pcm_f32le", 24000), ("pcm_mulaw", 8000), ("pcm_s16le", 16000)]
)
async def test_audio_says_the_words(sidecar, encoding, rate):
    text = "Please call me back tomorrow morning about the unpaid invoice."
    async with await TTSClient.connect(sidecar.url) as client:
        result = await client.synthesize(text, context_id="c1", sample_rate=rate, encoding=encoding)
    assert result.started["sample_rate"] == rate
    assert result.started["encoding"] == encoding
    assert result.end["type"] == "done"
    bytes_per_sample = {"pcm_f32le": 4, "pcm_s16le": 2, "pcm_mulaw": 1}[encoding]
    n_samples = len(result.audio_bytes) // bytes_per_sample
    assert len(result.audio_bytes) % bytes_per_sample == 0
    assert result.end["audio_seconds"] == pytest.approx(n_samples / rate, abs=1e-5)
    assert result.end["ttfb_ms"] > 0
    heard = transcribe(result.audio(), rate)
    assert word_error_rate(text, heard) <= 0.2, heard


async def test_continued_context_is_one_utterance(sidecar):
    pieces = ["Hello there, ", "this reply arrives ", "in several pieces. ", "It ends here."]
    async with await TTSClient.connect(sidecar.url) as client:
        for piece in pieces:
            await client.send(
                {"type": "synthesize", "text": piece, "context_id": "turn1", "continue": True}
            )
        await client.send({"type": "flush", "context_id": "turn1"})
        results = await client.collect(1)
    result = results["turn1"]
    assert result.end["type"] == "done"
    heard = transcribe(result.audio(), 24000)
    assert word_error_rate("".join(pieces), heard) <= 0.2, heard


async def test_first_audio_comes_before_the_flush(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        await client.send(
            {
                "type": "synthesize",
                "text": "First sentence is complete. ",
                "context_id": "a",
                "continue": True,
            }
        )
        started = await client.recv_json()
        assert started["type"] == "started"
        assert isinstance(await client.recv(), bytes)
        await client.send({"type": "flush", "context_id": "a"})
        results = await client.collect(1)
    assert results["a"].end["type"] == "done"


async def test_server_assigns_context_id(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        await client.send({"type": "synthesize", "text": "Hi."})
        started = await client.recv_json()
        assert started["type"] == "started"
        assert len(started["context_id"]) >= 8
        results = await client.collect(1)
    assert results[started["context_id"]].end["type"] == "done"


async def test_started_echoes_parameters(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        result = await client.synthesize(
            "Echo.",
            context_id="p",
            exaggeration=0.9,
            cfg_weight=0.3,
            temperature=0.6,
            seed=7,
            streaming=False,
        )
    started = result.started
    assert (started["exaggeration"], started["cfg_weight"], started["temperature"]) == (
        0.9,
        0.3,
        0.6,
    )
    assert started["seed"] == 7
    assert started["streaming"] is False
    assert started["voice_id"] == "default"


async def test_contexts_are_delivered_in_opening_order(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        await client.send({"type": "synthesize", "text": LONG_TEXT[:600], "context_id": "first"})
        await client.send({"type": "synthesize", "text": "Second.", "context_id": "second"})
        await client.send({"type": "synthesize", "text": "Third one.", "context_id": "third"})
        results = await client.collect(3)
        order = [
            m["context_id"]
            for m in client.messages
            if isinstance(m, dict) and m["type"] == "started"
        ]
    assert order == ["first", "second", "third"]
    assert all(r.end["type"] == "done" for r in results.values())


async def test_cancel_mid_stream_stops_audio_and_connection_goes_on(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        await client.send({"type": "synthesize", "text": LONG_TEXT, "context_id": "long"})
        assert (await client.recv_json())["type"] == "started"
        assert isinstance(await client.recv(), bytes)
        await client.send({"type": "cancel", "context_id": "long"})
        while True:
            item = await client.recv()
            if isinstance(item, dict):
                assert item == {"type": "cancelled", "context_id": "long"}
                break
        # nothing of "long" may follow; the next context plays normally
        result = await client.synthesize("Still here.", context_id="next")
        assert result.end["type"] == "done"
        assert result.started["context_id"] == "next"
        # cancel is idempotent
        reply = await client.request({"type": "cancel", "context_id": "long"}, "cancelled")
        assert reply["context_id"] == "long"
        reply = await client.request({"type": "cancel", "context_id": "never"}, "cancelled")
        assert reply["context_id"] == "never"
    assert "recv cancel context_id=long" in sidecar.log_text()


async def test_cancel_of_a_queued_context_comes_without_started(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        await client.send({"type": "synthesize", "text": LONG_TEXT[:500], "context_id": "playing"})
        await client.send({"type": "synthesize", "text": "Queued.", "context_id": "queued"})
        await client.send({"type": "cancel", "context_id": "queued"})
        results = await client.collect(2)
    assert results["queued"].end["type"] == "cancelled"
    assert results["queued"].started is None
    assert results["playing"].end["type"] == "done"


async def test_ended_context_cannot_take_more_text(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        await client.synthesize("Done now.", context_id="x")
        reply = await client.request(
            {"type": "synthesize", "text": "More.", "context_id": "x"}, "error"
        )
        assert reply["code"] == "invalid_request" and reply["context_id"] == "x"
        # a flush of a context that is not open is ignored: the next reply is for "y"
        await client.send({"type": "flush", "context_id": "nope"})
        result = await client.synthesize("Fine.", context_id="y")
        assert result.end["type"] == "done"


def _wav(seconds: float, rate: int = 16000, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    data = tone if channels == 1 else np.stack([tone] * channels, axis=1)
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


BAD_MESSAGES = [
    ("{not json", "invalid_json"),
    ("[1, 2, 3]", "invalid_request"),
    ('"text"', "invalid_request"),
    ('{"text": "no type"}', "invalid_request"),
    ('{"type": "sing"}', "unknown_type"),
    ('{"type": "synthesize"}', "invalid_request"),
    ('{"type": "synthesize", "text": ""}', "invalid_request"),
    ('{"type": "synthesize", "text": "   "}', "invalid_request"),
    ('{"type": "synthesize", "text": 5}', "invalid_request"),
    ('{"type": "synthesize", "text": "hi", "encoding": "mp3"}', "invalid_request"),
    ('{"type": "synthesize", "text": "hi", "sample_rate": 4000}', "invalid_request"),
    ('{"type": "synthesize", "text": "hi", "sample_rate": 96000}', "invalid_request"),
    ('{"type": "synthesize", "text": "hi", "sample_rate": "8000"}', "invalid_request"),
    ('{"type": "synthesize", "text": "hi", "continue": "yes"}', "invalid_request"),
    ('{"type": "synthesize", "text": "hi", "exaggeration": true}', "invalid_request"),
    ('{"type": "synthesize", "text": "hi", "exaggeration": 7}', "invalid_request"),
    ('{"type": "synthesize", "text": "hi", "continue": true}', "invalid_request"),
    ('{"type": "synthesize", "text": "hi", "context_id": "has space"}', "invalid_request"),
    ('{"type": "synthesize", "text": "hi", "voice_id": "../etc"}', "invalid_request"),
    ('{"type": "synthesize", "text": "hi", "voice_id": "ghost"}', "voice_not_found"),
    ('{"type": "cancel"}', "invalid_request"),
    ('{"type": "flush", "context_id": 3}', "invalid_request"),
    ('{"type": "register_voice", "voice_id": "../../x", "reference_audio": ""}', "invalid_request"),
    ('{"type": "register_voice", "voice_id": "v", "reference_audio": "***"}', "invalid_audio"),
    ('{"type": "register_voice", "voice_id": "v", "reference_audio": "aGVsbG8="}', "invalid_audio"),
    ('{"type": "delete_voice", "voice_id": "ghost"}', "voice_not_found"),
    ('{"type": "delete_voice", "voice_id": "default"}', "invalid_request"),
]


async def test_bad_input_gets_its_error_and_the_connection_goes_on(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        for raw, code in BAD_MESSAGES:
            await client.send(raw)
            reply = await client.recv_json()
            assert reply["type"] == "error", raw
            assert reply["code"] == code, (raw, reply)
            assert reply["message"]
        await client.send(b"\x00\x01binary")
        reply = await client.recv_json()
        assert reply["code"] == "invalid_request"
        result = await client.synthesize("Still working.", context_id="after")
        assert result.end["type"] == "done"
    voices = sidecar.voices_dir
    assert sorted(p.name for p in voices.iterdir()) == [".staging", ".trash"]
    assert not any((voices / ".staging").iterdir())


async def test_text_limits(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        reply = await client.request(
            {"type": "synthesize", "text": "a" * 100_000, "context_id": "big"}, "error"
        )
        assert reply["code"] == "text_too_long" and reply["context_id"] == "big"
        # a continued context that grows past the limit ends with text_too_long
        await client.send(
            {"type": "synthesize", "text": "Hello. ", "context_id": "grow", "continue": True}
        )
        await client.send(
            {"type": "synthesize", "text": "b" * 19_999, "context_id": "grow", "continue": True}
        )
        results = await client.collect(1)
        assert results["grow"].end["code"] == "text_too_long"
        assert (await client.synthesize("Next.", context_id="ok")).end["type"] == "done"


async def test_oversized_frame_closes_1009_and_server_goes_on(sidecar_factory):
    sidecar = sidecar_factory(TTS_MAX_FRAME_BYTES=65536)
    client = await TTSClient.connect(sidecar.url)
    assert client.ready["limits"]["max_frame_bytes"] == 65536
    await client.send(json.dumps({"type": "synthesize", "text": "x" * 70000}))
    with pytest.raises(ConnectionClosed):
        await client.recv(timeout=10)
    assert client.ws.close_code == 1009
    async with await TTSClient.connect(sidecar.url) as again:
        assert (await again.synthesize("Fine.")).end["type"] == "done"


async def test_client_disconnect_mid_stream_does_not_hurt_others(sidecar):
    leaving = await TTSClient.connect(sidecar.url)
    await leaving.send({"type": "synthesize", "text": LONG_TEXT, "context_id": "gone"})
    await leaving.recv()
    leaving.ws.transport.abort()  # vanish without a closing handshake
    async with await TTSClient.connect(sidecar.url) as client:
        result = await client.synthesize("Other clients are fine.", context_id="ok")
    assert result.end["type"] == "done"
    heard = transcribe(result.audio(), 24000)
    assert word_error_rate("Other clients are fine.", heard) <= 0.2


async def test_eight_clients_at_once_each_get_their_own_audio(sidecar):
    texts = [
        "Good morning, I would like the weather forecast for this weekend.",
        "Your package will arrive on Thursday before noon.",
        "Please hold while I transfer you to the billing department.",
        "The restaurant opens at six and closes at midnight.",
        "The library is closed on Sunday afternoons.",
        "Remember to bring your passport and a printed ticket.",
        "The meeting has been moved to the large conference room.",
        "Thank you for your patience, a nurse will call you soon.",
    ]

    async def one(text: str, n: int):
        async with await TTSClient.connect(sidecar.url) as client:
            return await client.synthesize(text, context_id=f"c{n}", encoding="pcm_s16le")

    results = await asyncio.gather(*(one(t, n) for n, t in enumerate(texts)))
    for text, result in zip(texts, results, strict=True):
        assert result.end["type"] == "done"
        assert result.end["audio_seconds"] == pytest.approx(len(result.audio_bytes) / 2 / 24000)
        heard = transcribe(result.audio(), 24000)
        assert word_error_rate(text, heard) <= 0.3, (text, heard)
        # each client got its own sentence, not a neighbour's
        assert word_error_rate(text, heard) < min(
            word_error_rate(t, heard) for t in texts if t != text
        )


async def test_voice_registration_is_stored_listed_and_survives_restart(sidecar_factory):
    sidecar = sidecar_factory()
    wav = _wav(4.0, rate=44100, channels=2)
    async with await TTSClient.connect(sidecar.url) as client:
        reply = await client.register_voice("alice", wav)
        assert reply["type"] == "voice_registered", reply
        assert reply["voice"]["duration_s"] == pytest.approx(4.0, abs=0.01)
        for seconds, code in ((1.0, "invalid_audio"), (31.0, "invalid_audio")):
            bad = await client.request(
                {
                    "type": "register_voice",
                    "voice_id": "short",
                    "reference_audio": base64.b64encode(_wav(seconds)).decode(),
                },
                "error",
            )
            assert bad["code"] == code and "s" in bad["message"]
        reserved = await client.request(
            {
                "type": "register_voice",
                "voice_id": "default",
                "reference_audio": base64.b64encode(wav).decode(),
            },
            "error",
        )
        assert reserved["code"] == "invalid_request"
        # piper stores the voice but will not pretend to speak with it
        err = await client.request(
            {"type": "synthesize", "text": "Hi.", "voice_id": "alice", "context_id": "v"}, "error"
        )
        assert err["code"] == "unsupported" and err["context_id"] == "v"
    stored = sidecar.voices_dir / "alice"
    assert (stored / "reference.wav").read_bytes() == wav
    assert json.loads((stored / "meta.json").read_text())["channels"] == 2

    sidecar.stop()
    sidecar.start()
    async with await TTSClient.connect(sidecar.url) as client:
        assert "alice" in client.ready["voices"]
        listed = await client.request({"type": "list_voices"}, "voices")
        ids = [v["voice_id"] for v in listed["voices"]]
        assert ids == ["default", "alice"]
        gone = await client.request(
            {"type": "delete_voice", "voice_id": "alice"}, ("voice_deleted", "error")
        )
        assert gone == {"type": "voice_deleted", "voice_id": "alice"}
        again = await client.request({"type": "delete_voice", "voice_id": "alice"}, "error")
        assert again["code"] == "voice_not_found"
    assert not stored.exists()


async def test_http_routes(sidecar):
    status, health = sidecar.get_json("/health")
    assert status == 200 and health["status"] == "ready" and health["engine"] == "piper"
    assert sidecar.get_json("/health/live")[0] == 200
    status, voices = sidecar.get_json("/v1/voices")
    assert status == 200 and voices["voices"][0]["voice_id"] == "default"
    status, body, headers = sidecar.get(
        "/v1/synthesize?text=Good%20morning%20everyone.&sample_rate=16000"
    )
    assert status == 200 and headers["Content-Type"] == "audio/wav"
    audio, rate = sf.read(io.BytesIO(body), dtype="float32")
    assert rate == 16000
    assert word_error_rate("Good morning everyone.", transcribe(audio, rate)) <= 0.2
    status, err = sidecar.get_json("/v1/synthesize?text=hi&sample_rate=3")
    assert status == 400 and err["code"] == "invalid_request"
    status, err = sidecar.get_json("/v1/synthesize?text=hi&voice_id=ghost")
    assert status == 404 and err["code"] == "voice_not_found"
    status, metrics, _ = sidecar.get("/metrics")
    text = metrics.decode()
    assert status == 200
    assert "tts_time_to_first_audio_seconds_bucket" in text
    assert "tts_connections_open" in text
    assert sidecar.get("/nothing/here")[0] == 404


async def test_metrics_count_outcomes(sidecar_factory):
    sidecar = sidecar_factory()
    async with await TTSClient.connect(sidecar.url) as client:
        await client.synthesize("One.", context_id="a")
        await client.request({"type": "synthesize", "text": ""}, "error")
    _, body, _ = sidecar.get("/metrics")
    text = body.decode()
    assert 'tts_contexts_total{outcome="done"} 1.0' in text
    assert 'tts_errors_total{code="invalid_request"} 1.0' in text


async def test_api_key_guards_every_route_but_health(sidecar_factory):
    sidecar = sidecar_factory(TTS_API_KEY="s3cret-key")
    assert sidecar.get("/health")[0] == 200
    for path in ("/metrics", "/v1/voices", "/v1/synthesize?text=hi", "/v1/stream/tts", "/other"):
        assert sidecar.get(path)[0] == 401, path
        assert sidecar.get(path, {"Authorization": "Bearer wrong"})[0] == 401, path
    assert sidecar.get("/v1/voices", {"Authorization": "Bearer s3cret-key"})[0] == 200
    assert sidecar.get("/v1/voices?api_key=s3cret-key")[0] == 200
    with pytest.raises(InvalidStatus) as info:
        await connect(sidecar.url)
    assert info.value.response.status_code == 401
    async with await TTSClient.connect(
        sidecar.url, additional_headers={"Authorization": "Bearer s3cret-key"}
    ) as client:
        assert (await client.synthesize("Authorized.")).end["type"] == "done"
    assert "s3cret-key" not in sidecar.log_text() + sidecar.stderr_text()


async def test_connection_limit_answers_503(sidecar_factory):
    sidecar = sidecar_factory(TTS_MAX_CONNECTIONS=2)
    a = await TTSClient.connect(sidecar.url)
    b = await TTSClient.connect(sidecar.url)
    with pytest.raises(InvalidStatus) as info:
        await connect(sidecar.url)
    assert info.value.response.status_code == 503
    await a.close()
    await asyncio.sleep(0.2)
    async with await TTSClient.connect(sidecar.url) as c:
        assert (await c.synthesize("Room again.")).end["type"] == "done"
    await b.close()
