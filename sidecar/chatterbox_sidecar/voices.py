"""The voice store: registered reference voices on disk, written atomically.

Layout::

    voices/
      <voice_id>/reference.wav   the reference audio as the client sent it
      <voice_id>/meta.json       what was validated (duration, rate, channels, hash)
      <voice_id>/conds.pt        engine artifacts (the GPU engine's cached conditionals)
      .staging/                  voices being written; removed at start-up
      .trash/                    voices being replaced or deleted; resolved at start-up

A voice directory is built whole in ``.staging`` and moved into place with one ``rename``, so a
crash at any point leaves every voice either wholly present or wholly absent.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile as sf
from loguru import logger

VOICE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # use fullmatch: "$" passes a final "\n"
DEFAULT_VOICE_ID = "default"
# Names no voice may take, in any case: the default voice and the device names that Windows
# file systems reserve (a folder "con" cannot exist there).
RESERVED_VOICE_IDS = frozenset(
    {"default", "con", "prn", "aux", "nul"}
    | {f"com{i}" for i in range(10)}
    | {f"lpt{i}" for i in range(10)}
)
MIN_REFERENCE_RATE = 8_000
MAX_REFERENCE_RATE = 96_000
REFERENCE_FILE = "reference.wav"
META_FILE = "meta.json"
# An unfinished write of a process on another host (a fleet sharing the folder over NFS) older
# than this is a crash's leftover; a younger one may still be in progress.
STALE_WRITE_SECONDS = 600.0
MIN_REFERENCE_SECONDS = 3.0
MAX_REFERENCE_SECONDS = 30.0


class VoiceError(Exception):
    """A voice operation that cannot be done; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str):
        """Initialize the error.

        Args:
            code: Protocol error code (``invalid_request``, ``invalid_audio``,
                ``voice_not_found``).
            message: Human-readable explanation.
        """
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Voice:
    """A registered voice as stored on disk.

    Parameters:
        voice_id: The voice's id.
        path: Its directory.
        duration_s: Duration of the reference audio in seconds.
        sample_rate: Sample rate of the reference audio.
        channels: Channel count of the reference audio.
        created_at: ISO 8601 time of registration.
        revision: Unique per registration (a replaced voice gets a new one, even within the
            second ``created_at`` counts in): engines key their caches on it, so a sidecar that
            shares the folder notices a voice another sidecar replaced.
    """

    voice_id: str
    path: Path
    duration_s: float
    sample_rate: int
    channels: int
    created_at: str
    revision: str = ""

    @property
    def reference_path(self) -> Path:
        """Returns: the reference WAV file."""
        return self.path / REFERENCE_FILE

    def artifact_path(self, name: str) -> Path:
        """Path of an engine artifact (for example ``conds.pt``) inside the voice directory.

        Args:
            name: File name of the artifact.

        Returns:
            The path; write it with :func:`atomic_write`.
        """
        return self.path / name

    def describe(self) -> dict:
        """Returns: the voice as listed to clients."""
        return {
            "voice_id": self.voice_id,
            "kind": "cloned",
            "duration_s": round(self.duration_s, 3),
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "created_at": self.created_at,
        }


def atomic_write(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the whole new one, never a part.

    Args:
        path: Destination file.
        data: Its full content.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def validate_voice_id(voice_id: object) -> str:
    """Check a client-supplied voice id.

    Args:
        voice_id: The value from the request.

    Returns:
        The id, unchanged.

    Raises:
        VoiceError: ``invalid_request`` if it is not a string matching ``VOICE_ID_PATTERN``.
    """
    if not isinstance(voice_id, str) or not VOICE_ID_PATTERN.fullmatch(voice_id):
        raise VoiceError(
            "invalid_request",
            "voice_id must be 1-64 characters of letters, digits, '_' or '-'",
        )
    return voice_id


@dataclass(frozen=True)
class ReferenceAudio:
    """Reference audio that passed validation.

    Parameters:
        data: The WAV file bytes.
        duration_s: Duration in seconds.
        sample_rate: Sample rate in Hz.
        channels: 1 or 2.
    """

    data: bytes
    duration_s: float
    sample_rate: int
    channels: int


def validate_reference_wav(data: bytes) -> ReferenceAudio:
    """Check that bytes are a WAV file usable as a voice reference (3-30 s, mono or stereo).

    Args:
        data: Decoded file bytes.

    Returns:
        The validated audio description.

    Raises:
        VoiceError: ``invalid_audio`` with the reason.
    """
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise VoiceError(
            "invalid_audio", f"reference_audio is not a readable WAV file: {_sndfile_reason(e)}"
        ) from None
    if info.format != "WAV" and info.format != "WAVEX":
        raise VoiceError("invalid_audio", f"reference_audio must be WAV, got {info.format}")
    if info.channels not in (1, 2):
        raise VoiceError(
            "invalid_audio", f"reference_audio must be mono or stereo, got {info.channels} channels"
        )
    if info.samplerate <= 0 or info.frames <= 0:
        raise VoiceError("invalid_audio", "reference_audio holds no samples")
    if not MIN_REFERENCE_RATE <= info.samplerate <= MAX_REFERENCE_RATE:
        raise VoiceError(
            "invalid_audio",
            f"reference_audio's sample rate must be {MIN_REFERENCE_RATE}-{MAX_REFERENCE_RATE} Hz, "
            f"got {info.samplerate} Hz",
        )
    duration = info.frames / info.samplerate
    if not MIN_REFERENCE_SECONDS <= duration <= MAX_REFERENCE_SECONDS:
        raise VoiceError(
            "invalid_audio",
            f"reference_audio must last {MIN_REFERENCE_SECONDS:g}-{MAX_REFERENCE_SECONDS:g} s, "
            f"got {duration:.2f} s",
        )
    try:  # sf.info reads only the header: decode the samples too, so truncated files fail here
        samples, _ = sf.read(io.BytesIO(data), dtype="float32")
    except (sf.LibsndfileError, RuntimeError) as e:
        raise VoiceError(
            "invalid_audio", f"reference_audio cannot be decoded: {_sndfile_reason(e)}"
        ) from None
    if not np.isfinite(samples).all():
        raise VoiceError("invalid_audio", "reference_audio holds NaN or infinite samples")
    return ReferenceAudio(data, duration, info.samplerate, info.channels)


def _sndfile_reason(error: Exception) -> str:
    # libsndfile's message names the file object by its repr ("<_io.BytesIO object at 0x..>");
    # the client gets the reason alone.
    reason = getattr(error, "error_string", None) or str(error)
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", reason)


# Unfinished writes (.staging and .trash entries) are named "<name>~<owner>", the owner being
# the writing process as hex of "pid@host", so that a starting sidecar cleans up only what a
# dead process left: sidecars of a fleet may share the folder.
_OWNER_MARK = "~"


def _owner_tag() -> str:
    return f"{os.getpid()}@{socket.gethostname()}".encode().hex()


def _owned(name: str) -> str:
    return f"{name}{_OWNER_MARK}{_owner_tag()}"


def _abandoned(entry: Path) -> bool:
    """Whether an unfinished write was left by a process that is gone.

    A write of a live process on this host (another sidecar sharing the folder, or this one)
    is in progress; another host's is abandoned once it is older than STALE_WRITE_SECONDS;
    an entry without an owner is a crash's leftover from before owners were recorded.
    """
    _, mark, tag = entry.name.partition(_OWNER_MARK)
    if not mark:
        return True
    try:
        pid_text, _, host = bytes.fromhex(tag).decode().partition("@")
        pid = int(pid_text)
    except ValueError:
        return True
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False
    try:
        st = entry.stat()  # ctime: a rename into .trash counts as its last change
    except FileNotFoundError:  # its owner finished meanwhile
        return False
    return time.time() - max(st.st_mtime, st.st_ctime) > STALE_WRITE_SECONDS


class VoiceStore:
    """Registered voices under one directory, safe against crashes and concurrent writers."""

    def __init__(self, root: Path, max_voices: int | None = None):
        """Initialize the store and recover from any interrupted write.

        Args:
            root: The voices directory (created if missing).
            max_voices: Most voices the store holds, or None for no limit.
        """
        self._root = root
        self._max_voices = max_voices
        self._staging = root / ".staging"
        self._trash = root / ".trash"
        self._lock = asyncio.Lock()
        for d in (root, self._staging, self._trash):
            d.mkdir(parents=True, exist_ok=True)
        self._recover()

    @property
    def root(self) -> Path:
        """Returns: the voices directory."""
        return self._root

    def _recover(self) -> None:
        for entry in self._staging.iterdir():
            if not _abandoned(entry):
                continue
            logger.info(f"Voice store: removing unfinished write {entry.name}")
            shutil.rmtree(entry, ignore_errors=True)
        for entry in self._trash.iterdir():
            if not _abandoned(entry):
                continue
            # "replaced-<id>-<uuid>": the old copy of a voice being replaced. If the crash came
            # between moving it aside and moving the new one in, put the old one back.
            kind, _, rest = entry.name.split(_OWNER_MARK, 1)[0].partition("-")
            voice_id = rest.rsplit("-", 1)[0]
            target = self._root / voice_id
            if kind == "replaced" and VOICE_ID_PATTERN.fullmatch(voice_id) and not target.exists():
                logger.warning(f"Voice store: restoring {voice_id} from an interrupted replace")
                os.rename(entry, target)
            else:
                shutil.rmtree(entry, ignore_errors=True)
        _fsync_dir(self._root)

    def _iter_dirs(self) -> Iterator[Path]:
        for entry in sorted(self._root.iterdir()):
            if entry.is_dir() and VOICE_ID_PATTERN.fullmatch(entry.name):
                yield entry

    def get(self, voice_id: str) -> Voice | None:
        """Look a voice up.

        Args:
            voice_id: The voice's id.

        Returns:
            The voice, or None if it is not registered (or its metadata is unreadable).
        """
        if not VOICE_ID_PATTERN.fullmatch(voice_id) or voice_id == DEFAULT_VOICE_ID:
            return None
        path = self._root / voice_id
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (OSError, ValueError):
            return None
        return Voice(
            voice_id=voice_id,
            path=path,
            duration_s=float(meta["duration_s"]),
            sample_rate=int(meta["sample_rate"]),
            channels=int(meta["channels"]),
            created_at=str(meta["created_at"]),
            # Voices stored before revisions existed: their content hash and time stand in.
            revision=str(meta.get("revision") or f"{meta.get('sha256', '')}-{meta['created_at']}"),
        )

    def list(self) -> list[Voice]:
        """Returns: every registered voice, sorted by id."""
        voices = (self.get(d.name) for d in self._iter_dirs())
        return [v for v in voices if v is not None]

    async def register(
        self,
        voice_id: str,
        audio: ReferenceAudio,
        prepare: Callable[[Voice], Awaitable[None]] | None = None,
    ) -> Voice:
        """Store a voice, replacing any voice with the same id, all or nothing.

        Args:
            voice_id: A validated id (not ``default``).
            audio: Validated reference audio.
            prepare: Called on the staged voice before it is committed, so that an engine can
                add its artifacts (``conds.pt``); if it raises, nothing is stored.

        Returns:
            The committed voice.

        Raises:
            VoiceError: ``invalid_request`` for a reserved id or one that differs from a stored
                voice's only in case; ``quota_exceeded`` when the store is full.
        """
        if voice_id.lower() in RESERVED_VOICE_IDS:
            raise VoiceError("invalid_request", f"voice_id '{voice_id}' is reserved")
        async with self._lock:
            stored = [d.name for d in self._iter_dirs()]
            folded = voice_id.lower()
            twin = next((n for n in stored if n.lower() == folded and n != voice_id), None)
            if twin is not None:
                raise VoiceError(
                    "invalid_request",
                    f"voice '{twin}' exists; voice ids may not differ only in case",
                )
            if (
                self._max_voices is not None
                and voice_id not in stored
                and len(stored) >= self._max_voices
            ):
                raise VoiceError(
                    "quota_exceeded",
                    f"the voice store is full ({self._max_voices} voices); delete one first",
                )
            staged_dir = self._staging / _owned(f"{voice_id}-{uuid.uuid4().hex}")
            try:
                staged = await asyncio.to_thread(self._write_staged, staged_dir, voice_id, audio)
                if prepare is not None:
                    await prepare(staged)
                await asyncio.to_thread(self._commit, staged_dir, voice_id)
            finally:
                if staged_dir.exists():
                    await asyncio.to_thread(shutil.rmtree, staged_dir, True)
        voice = self.get(voice_id)
        assert voice is not None
        logger.info(f"Voice store: registered {voice_id} ({audio.duration_s:.1f} s)")
        return voice

    def _write_staged(self, staged_dir: Path, voice_id: str, audio: ReferenceAudio) -> Voice:
        staged_dir.mkdir()
        created_at = datetime.now(UTC).isoformat(timespec="seconds")
        atomic_write(staged_dir / REFERENCE_FILE, audio.data)
        meta = {
            "format_version": 1,
            "voice_id": voice_id,
            "reference": REFERENCE_FILE,
            "duration_s": audio.duration_s,
            "sample_rate": audio.sample_rate,
            "channels": audio.channels,
            "sha256": hashlib.sha256(audio.data).hexdigest(),
            "created_at": created_at,
            "revision": uuid.uuid4().hex,
        }
        atomic_write(staged_dir / META_FILE, json.dumps(meta, indent=2).encode())
        return Voice(
            voice_id,
            staged_dir,
            audio.duration_s,
            audio.sample_rate,
            audio.channels,
            created_at,
            meta["revision"],
        )

    def _commit(self, staged_dir: Path, voice_id: str) -> None:
        _fsync_dir(staged_dir)
        target = self._root / voice_id
        old = self._trash / _owned(f"replaced-{voice_id}-{uuid.uuid4().hex}")
        if target.exists():
            os.rename(target, old)
        os.rename(staged_dir, target)
        _fsync_dir(self._root)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)

    async def delete(self, voice_id: str) -> None:
        """Remove a voice, all or nothing.

        Args:
            voice_id: A validated id.

        Raises:
            VoiceError: ``voice_not_found`` if it is not registered, ``invalid_request`` for the
                reserved id.
        """
        if voice_id.lower() == DEFAULT_VOICE_ID:
            raise VoiceError("invalid_request", f"voice_id '{DEFAULT_VOICE_ID}' cannot be deleted")
        async with self._lock:
            if self.get(voice_id) is None:
                raise VoiceError("voice_not_found", f"voice '{voice_id}' is not registered")
            await asyncio.to_thread(self._delete, voice_id)
        logger.info(f"Voice store: deleted {voice_id}")

    def _delete(self, voice_id: str) -> None:
        gone = self._trash / _owned(f"deleted-{voice_id}-{uuid.uuid4().hex}")
        os.rename(self._root / voice_id, gone)
        _fsync_dir(self._root)
        shutil.rmtree(gone, ignore_errors=True)
