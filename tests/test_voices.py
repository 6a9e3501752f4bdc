"""The voice store: validation, atomic replace and delete, recovery after a crash."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from chatterbox_sidecar import voices as voices_module
from chatterbox_sidecar.voices import VoiceError, VoiceStore, validate_reference_wav


def _wav(seconds: float, rate: int = 16000, channels: int = 1, fmt: str = "WAV") -> bytes:
    n = int(seconds * rate)
    data = np.random.default_rng(0).uniform(-0.3, 0.3, (n, channels)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "not a readable WAV"),
        (b"RIFF\x00\x00\x00\x00WAVEjunk", "not a readable WAV"),
        (_wav(4.0, fmt="FLAC"), "must be WAV"),
        (_wav(2.9), "3-30 s"),
        (_wav(30.5), "3-30 s"),
        (_wav(4.0, channels=3), "mono or stereo"),
    ],
)
def test_reference_validation(data, fragment):
    with pytest.raises(VoiceError, match=fragment) as info:
        validate_reference_wav(data)
    assert info.value.code == "invalid_audio"


def test_truncated_wav_is_refused():
    data = _wav(5.0)
    with pytest.raises(VoiceError):
        validate_reference_wav(data[: len(data) // 2])  # header claims 5 s, half is missing


async def test_register_replace_delete(tmp_path):
    store = VoiceStore(tmp_path)
    first = validate_reference_wav(_wav(4.0))
    second = validate_reference_wav(_wav(6.0, rate=48000, channels=2))
    voice = await store.register("bob", first)
    assert voice.reference_path.read_bytes() == first.data
    replaced = await store.register("bob", second)
    assert replaced.duration_s == pytest.approx(6.0)
    assert replaced.reference_path.read_bytes() == second.data
    assert [v.voice_id for v in store.list()] == ["bob"]
    await store.delete("bob")
    assert store.get("bob") is None
    assert not any((tmp_path / ".trash").iterdir())
    assert not any((tmp_path / ".staging").iterdir())


async def test_failed_prepare_stores_nothing_and_keeps_the_old_voice(tmp_path):
    store = VoiceStore(tmp_path)
    old = validate_reference_wav(_wav(4.0))
    await store.register("eve", old)

    async def broken(voice):
        (voice.path / "conds.pt").write_bytes(b"half")
        raise RuntimeError("engine fell over")

    with pytest.raises(RuntimeError):
        await store.register("eve", validate_reference_wav(_wav(5.0)), prepare=broken)
    assert store.get("eve").reference_path.read_bytes() == old.data
    assert not (tmp_path / "eve" / "conds.pt").exists()
    with pytest.raises(RuntimeError):
        await store.register("new", old, prepare=broken)
    assert store.get("new") is None
    assert not any((tmp_path / ".staging").iterdir())


async def test_prepare_sees_the_staged_voice_and_its_artifacts_are_committed(tmp_path):
    store = VoiceStore(tmp_path)

    async def prepare(voice):
        assert voice.reference_path.exists()
        assert ".staging" in str(voice.path)
        voice.artifact_path("conds.pt").write_bytes(b"conditionals")

    voice = await store.register("ann", validate_reference_wav(_wav(3.5)), prepare=prepare)
    assert voice.artifact_path("conds.pt").read_bytes() == b"conditionals"


async def test_recovery_after_crashes_at_each_step(tmp_path):
    store = VoiceStore(tmp_path)
    audio = validate_reference_wav(_wav(4.0))
    await store.register("kept", audio)
    await store.register("swapped", audio)
    # crash during a write: a half-built staging folder
    (tmp_path / ".staging" / "partial-123").mkdir()
    (tmp_path / ".staging" / "partial-123" / "reference.wav").write_bytes(b"RIFF")
    # crash during a replace, between moving the old copy aside and moving the new one in
    os.rename(tmp_path / "swapped", tmp_path / ".trash" / "replaced-swapped-abc")
    # crash during a delete, after the rename: the voice is gone for good
    await store.register("doomed", audio)
    os.rename(tmp_path / "doomed", tmp_path / ".trash" / "deleted-doomed-def")
    # crash after a completed replace, before the old copy was removed
    (tmp_path / ".trash" / "replaced-kept-ghi").mkdir()

    recovered = VoiceStore(tmp_path)
    assert [v.voice_id for v in recovered.list()] == ["kept", "swapped"]
    assert recovered.get("swapped").reference_path.read_bytes() == audio.data
    assert not any((tmp_path / ".trash").iterdir())
    assert not any((tmp_path / ".staging").iterdir())
    meta = json.loads((tmp_path / "kept" / "meta.json").read_text())
    assert meta["voice_id"] == "kept" and len(meta["sha256"]) == 64


def test_unreadable_metadata_is_not_listed(tmp_path):
    store = VoiceStore(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "meta.json").write_text("{")
    (tmp_path / "not a voice").mkdir()
    assert store.list() == []
    assert store.get("../etc") is None


async def test_a_sidecar_starting_on_a_shared_folder_leaves_writes_in_progress_alone(tmp_path):
    """Fleet sidecars share the voices folder: one starting up must not undo another's write."""
    writer = VoiceStore(tmp_path)
    audio = validate_reference_wav(_wav(4.0))
    await writer.register("swapped", audio)
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow_prepare(voice):  # the engine computing conds.pt while the write is staged
        started.set()
        await release.wait()

    new_audio = validate_reference_wav(_wav(5.0))
    task = asyncio.create_task(writer.register("fresh", new_audio, prepare=slow_prepare))
    await started.wait()
    # Another sidecar's replace, caught between moving the old copy aside and the new one in.
    # (this process is alive: its entries are a write in progress, as another sidecar's are)
    aside = tmp_path / ".trash" / voices_module._owned("replaced-swapped-abc")
    os.rename(tmp_path / "swapped", aside)
    staged = list((tmp_path / ".staging").iterdir())
    assert len(staged) == 1

    VoiceStore(tmp_path)  # a second sidecar starts on the same folder now

    assert staged[0].is_dir()  # the staged registration is still there
    assert not (tmp_path / "swapped").exists()  # and the replaced copy was not put back
    release.set()
    voice = await task
    assert voice.voice_id == "fresh"
    assert VoiceStore(tmp_path).get("fresh").reference_path.read_bytes() == new_audio.data


def test_writes_of_a_dead_process_are_recovered_at_once_and_another_hosts_after_a_while(
    tmp_path, monkeypatch
):
    store = VoiceStore(tmp_path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_tag = f"{int(dead.stdout)}@{socket.gethostname()}".encode().hex()
    remote_tag = b"4242@another-host".hex()
    (tmp_path / ".staging" / f"a-1~{dead_tag}").mkdir()
    (tmp_path / ".staging" / f"b-2~{remote_tag}").mkdir()
    VoiceStore(tmp_path)
    assert [p.name for p in (tmp_path / ".staging").iterdir()] == [f"b-2~{remote_tag}"]
    later = time.time() + voices_module.STALE_WRITE_SECONDS + 1
    monkeypatch.setattr(voices_module.time, "time", lambda: later)
    VoiceStore(tmp_path)
    assert not any((tmp_path / ".staging").iterdir())
    assert store.list() == []
