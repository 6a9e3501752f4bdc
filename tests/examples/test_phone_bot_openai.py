"""The phone bot's ``--llm openai`` path, against a fake OpenAI-compatible endpoint.

No LLM runs here, so the LLM is the one fake: ``FakeOpenAIServer`` answers
``POST /v1/chat/completions`` with a fixed streamed reply and records each request. Everything
else is real, as in ``test_phone_bot.py``: the bot server, Whisper tiny.en, the piper sidecar and
a fake Twilio caller over a real websocket.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.asr import normalize_words, word_error_rate

from .test_phone_bot import QUIET, REPLY_TIMEOUT, BotServer, caller_audio, heard
from .twilio_client import FakeTwilioCall

pytestmark = pytest.mark.slow

ANSWER = "Certainly. Your table for four is booked for tonight at eight o'clock."
QUESTION = "Please book a table for four people tonight."
SYSTEM_PROMPT = "You are the booking line of a small restaurant."


class FakeOpenAIServer:
    """A stand-in for an OpenAI-compatible chat completions endpoint (vLLM, Ollama, OpenAI).

    Every request gets ``ANSWER`` back as a stream of chunks, one per word.
    """

    def __init__(self):
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers["Authorization"]})
                fake.requests[-1].update(body)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                words = ANSWER.split(" ")
                for i, word in enumerate(words):
                    delta = {"content": word if i == 0 else f" {word}"}
                    if i == 0:
                        delta["role"] = "assistant"
                    self._event(delta, None)
                self._event({}, "stop")
                self.wfile.write(b"data: [DONE]\n\n")

            def _event(self, delta: dict, finish_reason: str | None):
                chunk = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": "fake-model",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeOpenAIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


def test_openai_mode_speaks_the_llm_answer(sidecar, llm, tmp_path):
    bot = BotServer(
        tmp_path,
        sidecar.url,
        "--llm",
        "openai",
        "--llm-base-url",
        llm.base_url,
        "--llm-model",
        "fake-model",
        "--llm-api-key",
        "local-key",
        "--system-prompt",
        SYSTEM_PROMPT,
        "--greeting",
        "",
    ).start()
    speech = caller_audio(sidecar, QUESTION)

    async def place_call():
        async with FakeTwilioCall(bot.ws_url) as call:
            # No greeting to wait for: speak once the call's pipeline listens (what the caller
            # says while its Whisper model loads is not heard).
            await bot.wait_for_log(": listening")
            said = call.say(speech)
            await asyncio.wait_for(said.done.wait(), 30)
            await call.wait_for("media", said.ended, REPLY_TIMEOUT)
            await call.wait_quiet(QUIET, REPLY_TIMEOUT)
            return call.media_after(0.0), said.started

    try:
        media, started = asyncio.run(place_call())
    finally:
        bot.stop()

    # No greeting: nothing came back before the caller spoke.
    assert media[0].at > started
    # The endpoint got the system prompt and the caller's words, with the key and model given.
    assert llm.requests, bot.log_text()[-3000:]
    request = llm.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer local-key"
    assert request["model"] == "fake-model"
    assert request["stream"] is True
    texts = [(m["role"], m["content"]) for m in request["messages"]]
    assert texts[0] == ("system", SYSTEM_PROMPT)
    assert texts[-1][0] == "user"
    assert word_error_rate(QUESTION, str(texts[-1][1])) <= 0.3, texts
    # The bot spoke the LLM's answer.
    text = heard(media)
    assert word_error_rate(ANSWER, normalize_words(text)) <= 0.3, text
