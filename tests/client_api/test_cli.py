"""The ``chatterbox-tts`` command line against a real piper sidecar, run as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given
from hypothesis import strategies as st
from pipecat_chatterbox.cli import split_text
from pipecat_chatterbox.client import TextTooLongError, decode_pcm

from tests.asr import transcribe, word_error_rate
from tests.client_api.helpers import LONG_TEXT, reference_wav


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``chatterbox-tts ARGS`` (as ``python -m pipecat_chatterbox.cli``)."""
    base = {k: v for k, v in os.environ.items() if k not in ("TTS_URL", "TTS_API_KEY")}
    return subprocess.run(
        [sys.executable, "-m", "pipecat_chatterbox.cli", *args],
        input=stdin,
        capture_output=True,
        env={**base, **(env or {})},
        timeout=120,
    )


def error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    """The CLI's error: one line on stderr, after anything the imports logged."""
    lines = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("chatterbox-tts: error: "), proc.stderr.decode()
    return lines[-1]


def test_voices_add_list_delete(sidecar, tmp_path):
    url = ["--url", sidecar.url]
    wav = tmp_path / "ref.wav"
    wav.write_bytes(reference_wav(4.0))

    added = run_cli(*url, "voices", "add", "cli_alice", str(wav))
    assert added.returncode == 0, added.stderr.decode()
    assert added.stdout.decode().startswith("registered cli_alice (4.0 s, 16000 Hz, mono)")

    listed = run_cli(*url, "voices", "list")
    assert listed.returncode == 0
    rows = [line.split() for line in listed.stdout.decode().splitlines()]
    assert rows[0] == ["VOICE", "KIND", "USABLE", "SECONDS"]
    assert ["cli_alice", "cloned", "no", "4.0"] in rows
    assert ["default", "builtin", "yes", "-"] in rows

    as_json = run_cli(*url, "voices", "list", "--json")
    voices = {v["voice_id"]: v for v in json.loads(as_json.stdout)}
    assert voices["cli_alice"]["duration_s"] == 4.0 and voices["cli_alice"]["channels"] == 1

    deleted = run_cli(*url, "voices", "delete", "cli_alice")
    assert (deleted.returncode, deleted.stdout.decode()) == (0, "deleted cli_alice\n")
    listed = run_cli(*url, "voices", "list", "--json")
    assert "cli_alice" not in {v["voice_id"] for v in json.loads(listed.stdout)}

    again = run_cli(*url, "voices", "delete", "cli_alice")
    assert again.returncode == 1
    assert "[voice_not_found] voice 'cli_alice' is not registered" in error_line(again)

    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not a recording")
    bad = run_cli(*url, "voices", "add", "cli_bad", str(not_audio))
    assert bad.returncode == 1 and "[invalid_audio]" in error_line(bad)
    missing = run_cli(*url, "voices", "add", "cli_bad", str(tmp_path / "missing.wav"))
    assert missing.returncode == 2 and "cannot read" in error_line(missing)
    bad_name = run_cli(*url, "voices", "add", "../escape", str(wav))
    assert bad_name.returncode == 1 and "[invalid_request]" in error_line(bad_name)


def test_say_writes_a_wav_that_says_the_words(sidecar, tmp_path):
    text = "Hello there, the command line is speaking."
    out = tmp_path / "hello.wav"
    proc = run_cli("--url", sidecar.url, "say", text, "-o", str(out), "--sample-rate", "16000")
    assert proc.returncode == 0, proc.stderr.decode()
    assert f"wrote {out}" in proc.stderr.decode()
    info = sf.info(out)
    assert (info.format, info.subtype, info.samplerate, info.channels) == (
        "WAV",
        "PCM_16",
        16000,
        1,
    )
    audio, rate = sf.read(out, dtype="float32")
    heard = transcribe(audio, rate)
    assert word_error_rate(text, heard) <= 0.2, heard
    assert not list(tmp_path.glob(".*.part"))


def test_say_raw_pcm_to_stdout_and_text_from_stdin(sidecar):
    proc = run_cli(
        "--url",
        sidecar.url,
        "say",
        "-",
        "--raw",
        "--sample-rate",
        "8000",
        "--encoding",
        "mulaw",
        stdin=b"Raw audio for a phone line.",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    seconds = len(proc.stdout) / 8000  # one byte a sample
    assert 0.8 < seconds < 6.0
    samples = decode_pcm(proc.stdout, "pcm_mulaw")
    assert np.sqrt(np.mean(np.square(samples))) > 0.01
    assert "chatterbox-tts" not in proc.stderr.decode()  # nothing to report


async def test_long_text_is_spoken_in_parts_with_a_progress_bar(sidecar_factory, tmp_path):
    sidecar = sidecar_factory(TTS_MAX_TEXT_CHARS=300)
    from pipecat_chatterbox.client import ChatterboxClient

    async with ChatterboxClient(sidecar.url) as client:  # one context cannot hold this text
        with pytest.raises(TextTooLongError):
            await client.synthesize(LONG_TEXT)

    out = tmp_path / "story.flac"
    proc = run_cli("--url", sidecar.url, "say", LONG_TEXT, "-o", str(out), "--progress")
    assert proc.returncode == 0, proc.stderr.decode()
    stderr = proc.stderr.decode()
    assert "] 100% " in stderr and " s of audio" in stderr
    parts = split_text(LONG_TEXT, 300)
    assert len(parts) >= 6
    assert sidecar.log_text().count("recv synthesize") - 1 == len(parts)  # -1: the failed one
    info = sf.info(out)
    assert info.format == "FLAC" and info.samplerate == 24000
    assert info.duration > len(LONG_TEXT) / 25  # well over a minute of speech


def test_a_failed_say_leaves_an_existing_file_alone(sidecar, tmp_path):
    out = tmp_path / "keep.wav"
    sf.write(out, np.zeros(800, dtype=np.int16), 8000)
    before = out.read_bytes()
    proc = run_cli("--url", sidecar.url, "say", "Hi.", "--voice", "nobody_here", "-o", str(out))
    assert proc.returncode == 1 and "[voice_not_found]" in error_line(proc)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.wav"]


def test_health_settings_from_the_environment_and_exit_codes(sidecar_factory, tmp_path):
    sidecar = sidecar_factory(TTS_API_KEY="the-right-key")
    health = run_cli("--url", sidecar.url, "health")
    assert health.returncode == 0 and health.stdout.decode().startswith("ready: piper ")
    doc = json.loads(run_cli("--url", sidecar.url, "health", "--json").stdout)
    assert doc["status"] == "ready"

    env = {"TTS_URL": sidecar.url, "TTS_API_KEY": "the-right-key"}
    listed = run_cli("voices", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr.decode()
    assert [v["voice_id"] for v in json.loads(listed.stdout)] == ["default"]
    wrong = run_cli("voices", "list", env={**env, "TTS_API_KEY": "a-wrong-key"})
    assert wrong.returncode == 1 and "[unauthorized]" in error_line(wrong)
    flag_wins = run_cli("--api-key", "a-wrong-key", "voices", "list", env=env)
    assert flag_wins.returncode == 1

    nowhere = sidecar.url.replace(str(sidecar.port), "1")
    for command in (["voices", "list"], ["health"], ["say", "Hi.", "--raw"]):
        proc = run_cli("--url", nowhere, *command)
        assert proc.returncode == 3, (command, proc.stderr.decode())
        assert "[connection_failed]" in error_line(proc)

    usage = [
        [],
        ["say"],
        ["--url", sidecar.url, "say", "Hi."],  # neither -o nor --raw
        ["--url", sidecar.url, "say", "Hi.", "-o", str(tmp_path / "a.mp9")],
        ["--url", sidecar.url, "say", "Hi.", "--raw", "--sample-rate", "96000"],
        ["--url", "http://127.0.0.1:1/", "voices", "list"],
        ["voices", "rename", "a", "b"],
    ]
    for args in usage:
        proc = run_cli(*args, env=env)
        assert proc.returncode == 2, (args, proc.stderr.decode())
    assert not (tmp_path / "a.mp9").exists()


def test_help_documents_the_exit_codes():
    proc = run_cli("--help")
    assert proc.returncode == 0
    text = proc.stdout.decode()
    for line in (
        "0  success",
        "1  the sidecar answered with an error",
        "2  bad arguments",
        "3  the sidecar cannot be reached",
        "TTS_URL",
        "TTS_API_KEY",
    ):
        assert line in text
    for command in ("say", "voices", "health"):
        assert command in text


@given(
    text=st.text(alphabet=st.sampled_from("ab .!?\n"), max_size=400),
    max_chars=st.integers(1, 60),
)
def test_split_text_keeps_every_character_in_parts_that_fit(text, max_chars):
    parts = split_text(text, max_chars)
    assert all(0 < len(p) <= max_chars for p in parts)
    assert all(p == p.strip() for p in parts)
    assert "".join("".join(p.split()) for p in parts) == "".join(text.split())


def test_split_text_cuts_at_paragraphs_then_sentences():
    text = "First paragraph, short.\n\nSecond one. It has two sentences."
    assert split_text(text, 1000) == ["First paragraph, short. Second one. It has two sentences."]
    assert split_text(text, 40) == ["First paragraph, short.", "Second one. It has two sentences."]
    assert split_text(text, 30) == [
        "First paragraph, short.",
        "Second one.",
        "It has two sentences.",
    ]
    assert split_text("a" * 25, 10) == ["a" * 10, "a" * 10, "a" * 5]
    assert split_text("one two three", 8) == ["one two", "three"]
