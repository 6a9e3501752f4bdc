"""The Python client against a real piper sidecar."""

from __future__ import annotations

import asyncio
import audioop
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pipecat_chatterbox.client import (
    AudioChunk,
    AuthenticationError,
    BusyError,
    ChatterboxClient,
    ChatterboxError,
    ConnectionFailedError,
    ConnectionLostError,
    InvalidAudioError,
    InvalidRequestError,
    SyncChatterboxClient,
    TextTooLongError,
    UnsupportedError,
    VoiceNotFoundError,
    decode_pcm,
    health_url,
)

from tests.client_api.helpers import LONG_TEXT, reference_wav
from tests.conftest import ROOT


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples)))) if samples.size else 0.0


async def wait_for_log(sidecar, fragment: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while fragment not in sidecar.log_text():
        assert asyncio.get_running_loop().time() < deadline, f"{fragment!r} not in the log"
        await asyncio.sleep(0.1)


def test_decode_pcm_matches_the_reference_decoders():
    every_byte = bytes(range(256))
    expected = np.frombuffer(audioop.ulaw2lin(every_byte, 2), dtype="<i2") / 32768.0
    assert np.array_equal(decode_pcm(every_byte, "pcm_mulaw"), expected.astype(np.float32))
    ints = np.array([-32768, -1, 0, 1, 32767], dtype="<i2")
    assert decode_pcm(ints.tobytes(), "pcm_s16le").tolist() == (ints / 32768.0).tolist()
    floats = np.array([-1.0, 0.25, 1.0], dtype="<f4")
    assert decode_pcm(floats.tobytes(), "pcm_f32le").tolist() == floats.tolist()
    with pytest.raises(ValueError, match="unknown encoding"):
        decode_pcm(b"", "opus")


def test_health_url():
    assert health_url("ws://h:8002/v1/stream/tts?api_key=x") == "http://h:8002/health"
    assert health_url("wss://tts.example.com/v1/stream/tts") == "https://tts.example.com/health"


async def test_synthesize_returns_the_whole_audio(sidecar):
    async with ChatterboxClient(sidecar.url) as client:
        assert client.info is not None and client.info.engine == "piper"
        result = await client.synthesize(
            "Hello there. This is the client speaking.",
            sample_rate=16000,
            encoding="pcm_s16le",
            context_id="client-1",
        )
    assert result.context_id == "client-1"
    assert (result.sample_rate, result.encoding, result.cancelled) == (16000, "pcm_s16le", False)
    assert result.parameters["voice_id"] == "default"
    # the sidecar's count of seconds is exactly the bytes that arrived
    assert result.audio_seconds == pytest.approx(len(result.audio) / 2 / 16000, abs=1e-5)
    assert 1.0 < result.audio_seconds < 8.0
    assert result.ttfb_ms is not None and result.ttfb_ms > 0
    assert rms(result.samples()) > 0.01


async def test_stream_yields_chunks_of_each_context_in_order(sidecar):
    async with ChatterboxClient(sidecar.url) as client:
        first = await client.open_context("The first utterance.", encoding="pcm_f32le")
        second = await client.open_context("And the second one.", sample_rate=8000)
        assert first.context_id != second.context_id
        chunks: dict[str, list[AudioChunk]] = {}

        async def drain(ctx):
            chunks[ctx.context_id] = [c async for c in ctx]

        await asyncio.gather(drain(second), drain(first))
        for ctx, rate in ((first, 24000), (second, 8000)):
            got = chunks[ctx.context_id]
            assert got and all(c.context_id == ctx.context_id for c in got)
            assert all(c.sample_rate == rate and c.encoding == "pcm_f32le" for c in got)
            assert sum(c.duration for c in got) == pytest.approx(ctx.audio_seconds, abs=1e-5)
            assert rms(np.concatenate([c.samples() for c in got])) > 0.01

        streamed = [c async for c in client.stream("Streamed through the helper.")]
        assert len({c.context_id for c in streamed}) == 1
        assert sum(c.duration for c in streamed) > 0.5


async def test_text_can_arrive_in_pieces(sidecar):
    async def tokens():
        for piece in ["Pieces ", "of text ", "arrive ", "one ", "by ", "one."]:
            await asyncio.sleep(0.02)
            yield piece

    async with ChatterboxClient(sidecar.url) as client:
        result = await client.synthesize(tokens(), context_id="pieces-1")
    assert result.audio_seconds > 0.8 and rms(result.samples()) > 0.01
    log = sidecar.log_text()
    assert "recv synthesize context_id=pieces-1 continue=True" in log
    assert "recv flush context_id=pieces-1" in log


async def test_cancel_stops_a_context_and_the_connection_goes_on(sidecar):
    async with ChatterboxClient(sidecar.url) as client:
        ctx = await client.open_context(LONG_TEXT, context_id="to-cancel")
        first = await anext(ctx)
        assert first.context_id == "to-cancel"
        await ctx.cancel()
        rest = [c async for c in ctx]
        assert ctx.cancelled and ctx.ended
        heard = first.duration + sum(c.duration for c in rest)
        assert heard < 30.0  # the whole text is well over a minute of speech
        await client.cancel("to-cancel")  # cancelling an ended context is harmless
        after = await client.synthesize("Still here.")
        assert after.audio_seconds > 0.3 and not after.cancelled


async def test_leaving_a_stream_early_cancels_its_context(sidecar):
    async with ChatterboxClient(sidecar.url) as client:
        async for chunk in client.stream(LONG_TEXT, context_id="left-early"):  # noqa: B007
            break
        assert chunk.context_id == "left-early"
        await wait_for_log(sidecar, "recv cancel context_id=left-early")
        assert client.connected
        assert (await client.synthesize("Next.")).audio_seconds > 0.2


async def test_voices_register_list_delete_and_typed_errors(sidecar, tmp_path):
    wav = tmp_path / "ref.wav"
    wav.write_bytes(reference_wav(4.0))
    async with ChatterboxClient(sidecar.url) as client:
        voice = await client.register_voice("client_alice", wav)
        assert voice["voice_id"] == "client_alice"
        assert voice["duration_s"] == pytest.approx(4.0, abs=0.01)
        listed = {v["voice_id"]: v for v in await client.list_voices()}
        assert listed["client_alice"]["kind"] == "cloned"
        assert listed["client_alice"]["usable"] is False  # piper stores but cannot clone
        assert listed["default"]["usable"] is True

        # bytes work as well as a path; registering again replaces the voice
        again = await client.register_voice("client_alice", reference_wav(6.0, rate=24000))
        assert again["duration_s"] == pytest.approx(6.0, abs=0.01)

        with pytest.raises(UnsupportedError) as e:
            await client.synthesize("Cloned.", voice_id="client_alice", context_id="clone-1")
        assert (e.value.code, e.value.context_id) == ("unsupported", "clone-1")
        with pytest.raises(VoiceNotFoundError) as e:
            await client.synthesize("Nobody.", voice_id="nobody_here", context_id="nobody-1")
        assert (e.value.code, e.value.context_id) == ("voice_not_found", "nobody-1")

        with pytest.raises(InvalidAudioError) as e:
            await client.register_voice("client_short", reference_wav(1.0))
        assert e.value.voice_id == "client_short" and "3-30 s" in e.value.message
        with pytest.raises(InvalidRequestError):
            await client.register_voice("../escape", wav)
        with pytest.raises(InvalidRequestError):
            await client.register_voice("default", wav)
        with pytest.raises(FileNotFoundError):
            await client.register_voice("client_missing", tmp_path / "missing.wav")

        await client.delete_voice("client_alice")
        with pytest.raises(VoiceNotFoundError) as e:
            await client.delete_voice("client_alice")
        assert e.value.voice_id == "client_alice"
        assert "client_alice" not in {v["voice_id"] for v in await client.list_voices()}
        # every error above left the connection usable
        assert client.connected
        assert (await client.synthesize("Fine.")).audio_seconds > 0.2


async def test_concurrent_voice_requests_get_their_own_answers(sidecar):
    async with ChatterboxClient(sidecar.url) as client:
        results = await asyncio.gather(
            client.register_voice("client_c1", reference_wav(3.5)),
            client.register_voice("client_c2", reference_wav(5.0)),
            client.delete_voice("client_never"),
            client.list_voices(),
            return_exceptions=True,
        )
        assert results[0]["voice_id"] == "client_c1" and results[0]["duration_s"] == 3.5
        assert results[1]["voice_id"] == "client_c2" and results[1]["duration_s"] == 5.0
        assert isinstance(results[2], VoiceNotFoundError)
        assert isinstance(results[3], list)
        for name in ("client_c1", "client_c2"):
            await client.delete_voice(name)


async def test_limits_come_back_as_typed_errors(sidecar_factory):
    sidecar = sidecar_factory(TTS_MAX_TEXT_CHARS=200, TTS_MAX_CONTEXTS=1)
    async with ChatterboxClient(sidecar.url) as client:
        with pytest.raises(TextTooLongError) as e:
            await client.synthesize("word " * 60, context_id="too-long")
        assert e.value.context_id == "too-long"
        first = await client.open_context("One context may be open at a time on this one.")
        with pytest.raises(BusyError) as e:
            await client.synthesize("A second one is refused.", context_id="second")
        assert (e.value.code, e.value.context_id) == ("busy", "second")
        assert (await first.collect()).audio_seconds > 0.5
        with pytest.raises(InvalidRequestError):
            await client.synthesize("   ")
        with pytest.raises(InvalidRequestError):
            await client.synthesize("Hi.", context_id="has space")


async def test_api_key_health_and_unreachable_sidecar(sidecar_factory):
    sidecar = sidecar_factory(TTS_API_KEY="the-right-key")
    with pytest.raises(AuthenticationError) as e:
        await ChatterboxClient(sidecar.url, "a-wrong-key").connect()
    assert e.value.code == "unauthorized" and "the-right-key" not in str(e.value)
    with pytest.raises(AuthenticationError):
        await ChatterboxClient(sidecar.url).list_voices()

    client = ChatterboxClient(sidecar.url, "the-right-key")
    try:
        assert [v["voice_id"] for v in await client.list_voices()] == ["default"]
        health = await client.health()  # /health needs no key
        assert health["status"] == "ready" and health["engine"] == "piper"
    finally:
        await client.close()

    nowhere = sidecar.url.replace(str(sidecar.port), "1")
    with pytest.raises(ConnectionFailedError) as e:
        await ChatterboxClient(nowhere, open_timeout=5).synthesize("Hi.")
    assert isinstance(e.value, ConnectionError) and e.value.code == "connection_failed"
    with pytest.raises(ConnectionFailedError):
        await ChatterboxClient(nowhere).health()
    with pytest.raises(ValueError, match="not a websocket URL"):
        await ChatterboxClient("http://127.0.0.1:1/").connect()


async def test_a_lost_connection_fails_what_waits_and_the_next_call_reconnects(sidecar_factory):
    sidecar = sidecar_factory()
    client = ChatterboxClient(sidecar.url)
    try:
        ctx = await client.open_context(LONG_TEXT)
        await anext(ctx)
        sidecar.kill()
        with pytest.raises(ConnectionLostError) as e:
            async for _ in ctx:
                pass
        assert e.value.code == "connection_closed"
        assert not client.connected
        sidecar.start()  # the same port again
        assert (await client.synthesize("Back again.")).audio_seconds > 0.3
    finally:
        await client.close()


def test_sync_client(sidecar, tmp_path):
    wav = tmp_path / "ref.wav"
    wav.write_bytes(reference_wav())
    with SyncChatterboxClient(sidecar.url) as client:
        assert client.info.engine == "piper"
        result = client.synthesize("Without an event loop.", encoding="pcm_s16le")
        assert result.audio_seconds > 0.5 and rms(result.samples()) > 0.01
        for chunk in client.stream(LONG_TEXT, context_id="sync-break"):  # noqa: B007
            break
        assert chunk.context_id == "sync-break"
        assert client.register_voice("client_sync", wav)["voice_id"] == "client_sync"
        assert "client_sync" in {v["voice_id"] for v in client.list_voices()}
        client.delete_voice("client_sync")
        with pytest.raises(VoiceNotFoundError):
            client.delete_voice("client_sync")
        assert client.health()["status"] == "ready"
        streamed = list(client.stream("Whole stream."))
        assert sum(c.duration for c in streamed) > 0.5
    assert "recv cancel context_id=sync-break" in sidecar.log_text()


# Runs in a fresh interpreter where ``import pipecat`` fails. The package's __init__ imports the
# Pipecat service, so the submodules are loaded under a bare package object: this checks the
# client, the voice helpers and the CLI themselves, whatever __init__ does.
NO_PIPECAT = textwrap.dedent(
    """
    import asyncio, json, sys, types
    sys.modules["pipecat"] = None
    package = types.ModuleType("pipecat_chatterbox")
    package.__path__ = [sys.argv[1]]
    sys.modules["pipecat_chatterbox"] = package

    from pipecat_chatterbox import cli, client, voices

    url = sys.argv[2]
    listed = asyncio.run(voices.list_voices(url))
    try:
        asyncio.run(voices.delete_voice(url, "nobody_here"))
    except client.ChatterboxError as e:
        error = [type(e).__name__, e.code]
    with client.SyncChatterboxClient(url) as c:
        seconds = c.synthesize("No pipecat here.").audio_seconds
    status = cli.main(["--url", url, "voices", "list", "--json"])
    print(json.dumps({
        "voices": [v["voice_id"] for v in listed],
        "error": error,
        "seconds": seconds,
        "cli": status,
        "pipecat_loaded": any(m.startswith("pipecat.") for m in sys.modules),
    }))
    """
)


def test_client_voice_helpers_and_cli_need_no_pipecat(sidecar):
    env = {k: v for k, v in os.environ.items() if k not in ("TTS_URL", "TTS_API_KEY")}
    package = ROOT / "plugin" / "pipecat_chatterbox"
    proc = subprocess.run(
        [sys.executable, "-c", NO_PIPECAT, str(package), sidecar.url],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["voices"] == ["default"]
    assert report["error"] == ["VoiceNotFoundError", "voice_not_found"]
    assert report["seconds"] > 0.3
    assert report["cli"] == 0
    assert report["pipecat_loaded"] is False


def test_errors_carry_their_codes():
    error = ChatterboxError("busy", "at capacity", context_id="c1")
    assert str(error) == "[busy] at capacity"
    assert (error.code, error.message, error.context_id, error.voice_id) == (
        "busy",
        "at capacity",
        "c1",
        None,
    )


def test_the_installed_package_imports_without_pipecat():
    code = (
        "import sys; sys.modules['pipecat'] = None\n"
        "from pipecat_chatterbox import register_voice, list_voices, delete_voice\n"
        "from pipecat_chatterbox.cli import main\n"
        "from pipecat_chatterbox.client import ChatterboxClient\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
