"""``chatterbox-tts``: speak text and manage voices on a chatterbox sidecar from the shell.

::

    chatterbox-tts say "Hello there" -o hello.wav
    chatterbox-tts say - --raw --sample-rate 16000 < story.txt | aplay -f S16_LE -r 16000
    chatterbox-tts voices add alice alice.wav
    chatterbox-tts voices list
    chatterbox-tts voices delete alice
    chatterbox-tts health

It talks to the sidecar over its websocket protocol through
:class:`~pipecat_chatterbox.client.ChatterboxClient` and needs no Pipecat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf
from loguru import logger

from pipecat_chatterbox.client import (
    BYTES_PER_SAMPLE,
    DEFAULT_URL,
    ChatterboxClient,
    ChatterboxError,
    SpeechContext,
)

PROG = "chatterbox-tts"

EXIT_OK = 0
EXIT_ERROR = 1  # the sidecar answered with an error (or is not ready, for `health`)
EXIT_USAGE = 2  # bad arguments or an unreadable/unwritable local file
EXIT_UNREACHABLE = 3  # the sidecar cannot be reached, or the connection dropped
EXIT_INTERRUPTED = 130  # Ctrl-C

# Long texts are spoken as several contexts of at most this many characters, cut at paragraph or
# sentence ends, so that the progress bar can advance and texts over the sidecar's
# max_text_chars can be spoken. A few contexts are kept open ahead so generation never waits.
PART_CHARS = 500
PARTS_AHEAD = 4
PART_PAUSE_SECONDS = 0.15  # silence between parts, like the engines' pause between sentences
PROGRESS_INTERVAL = 0.1  # seconds between progress bar redraws

_SENTENCE_END = re.compile(r"(?<=[.!?;:])[\"')\]]*\s+")
_PARAGRAPH_END = re.compile(r"\n\s*\n")

_EPILOG = f"""\
exit status:
  0  success
  1  the sidecar answered with an error (health: the sidecar is not ready)
  2  bad arguments, or a local file that cannot be read or written
  3  the sidecar cannot be reached, or the connection dropped
  130  interrupted

environment:
  TTS_URL      the sidecar's websocket URL (default {DEFAULT_URL})
  TTS_API_KEY  the sidecar's API key
"""


class UsageError(Exception):
    """A problem with the command line or a local file (exit status 2)."""


#
# Text splitting
#


def split_text(text: str, max_chars: int) -> list[str]:
    """Cut text into parts of at most ``max_chars`` characters.

    Cuts fall at paragraph ends where possible, else at sentence ends, else at spaces; a
    word longer than ``max_chars`` is cut where it must be.

    Args:
        text: The text.
        max_chars: The largest part.

    Returns:
        The non-empty parts, in order, with their whitespace normalised at the cuts.
    """
    pieces: list[str] = []
    for paragraph in _PARAGRAPH_END.split(text):
        paragraph = paragraph.strip()
        if len(paragraph) <= max_chars:
            pieces.append(paragraph)
            continue
        for sentence in _SENTENCE_END.split(paragraph):
            while len(sentence) > max_chars:
                cut = sentence.rfind(" ", 0, max_chars + 1)
                cut = cut if cut > 0 else max_chars
                pieces.append(sentence[:cut])
                sentence = sentence[cut:].lstrip()
            pieces.append(sentence)
    parts: list[str] = []
    for piece in (p.strip() for p in pieces):
        if not piece:
            continue
        if parts and len(parts[-1]) + 1 + len(piece) <= max_chars:
            parts[-1] = f"{parts[-1]} {piece}"
        else:
            parts.append(piece)
    return parts


#
# Output
#


class _Sink:
    """Where ``say`` writes audio: raw bytes to a stream, or a sound file written atomically."""

    def __init__(self, path: Path | None, raw: bool, sample_rate: int, encoding: str):
        self._path = path
        self._raw = raw
        self._stream: BinaryIO | None = None
        self._sound: sf.SoundFile | None = None
        self._tmp: Path | None = None
        if path is None:
            self._stream = sys.stdout.buffer
            return
        # Written beside the target and renamed at the end, so that a failure leaves no
        # half-written file (and an old file of that name is replaced whole or not at all).
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            if raw:
                self._stream = self._tmp.open("wb")
            else:
                self._sound = sf.SoundFile(
                    self._tmp, "w", samplerate=sample_rate, channels=1, format=sound_format(path)
                )
        except (OSError, sf.LibsndfileError) as e:
            self._tmp.unlink(missing_ok=True)
            raise UsageError(f"cannot write {path}: {e}") from e

    def write(self, data: bytes) -> None:
        if self._sound is not None:
            self._sound.write(np.frombuffer(data, dtype="<i2"))
        else:
            assert self._stream is not None
            self._stream.write(data)
            self._stream.flush()

    def commit(self) -> None:
        self._close()
        if self._tmp is not None and self._path is not None:
            os.replace(self._tmp, self._path)

    def discard(self) -> None:
        self._close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._sound is not None:
            self._sound.close()
        elif self._stream is not None and self._path is not None:
            self._stream.close()


def sound_format(path: Path) -> str:
    """The soundfile format for an output file name.

    Args:
        path: The file name; its extension picks the format (``.wav``, ``.flac``, ``.ogg``...).

    Returns:
        The format name.

    Raises:
        UsageError: No extension, or one that libsndfile cannot write.
    """
    name = path.suffix.lstrip(".").upper()
    if name not in sf.available_formats():
        raise UsageError(
            f"cannot tell the audio format of {path.name!r}: name it .wav, .flac or .ogg, "
            "or pass --raw for headerless PCM"
        )
    return name


def silence(seconds: float, sample_rate: int, encoding: str) -> bytes:
    """Silence in a protocol encoding.

    Args:
        seconds: Its length.
        sample_rate: The rate.
        encoding: ``pcm_f32le``, ``pcm_s16le`` or ``pcm_mulaw``.

    Returns:
        The bytes.
    """
    samples = int(seconds * sample_rate)
    if encoding == "pcm_mulaw":
        return b"\xff" * samples  # G.711 mu-law zero
    return bytes(samples * BYTES_PER_SAMPLE[encoding])


class _Progress:
    """A one-line progress bar on stderr: characters spoken out of the total."""

    WIDTH = 30

    def __init__(self, total_chars: int, enabled: bool):
        self._total = max(total_chars, 1)
        self._enabled = enabled
        self._done = 0
        self._audio = 0.0
        self._drawn_at = 0.0

    def audio(self, seconds: float) -> None:
        self._audio += seconds
        if time.monotonic() - self._drawn_at >= PROGRESS_INTERVAL:
            self._draw()

    def advance(self, chars: int) -> None:
        self._done += chars
        self._draw()

    def finish(self) -> None:
        if self._enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _draw(self) -> None:
        if not self._enabled:
            return
        self._drawn_at = time.monotonic()
        fraction = min(self._done / self._total, 1.0)
        filled = int(fraction * self.WIDTH)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {fraction:4.0%} "
            f"{self._done}/{self._total} chars, {self._audio:.1f} s of audio"
        )
        sys.stderr.flush()


#
# Commands
#


def _read_text(arg: str) -> str:
    if arg != "-":
        return arg
    return sys.stdin.read()


async def cmd_say(client: ChatterboxClient, args: argparse.Namespace) -> int:
    """Speak text into a sound file or as raw PCM."""
    if args.output is None and not args.raw:
        raise UsageError("say needs -o FILE (a .wav, .flac or .ogg) or --raw (PCM to stdout)")
    if args.output == "-" and not args.raw:
        raise UsageError("-o - writes to stdout, which needs --raw")
    text = _read_text(args.text)
    if not text.strip():
        raise UsageError("the text is empty")
    path = None if args.output in (None, "-") else Path(args.output)
    if path is not None and not args.raw:
        sound_format(path)  # fail on a bad name before connecting
    encoding = f"pcm_{args.encoding}" if args.raw else "pcm_s16le"

    info = await client.connect()
    limits = info.limits
    parts = split_text(text, min(PART_CHARS, int(limits.get("max_text_chars", PART_CHARS))))
    window = max(1, min(PARTS_AHEAD, int(limits.get("max_contexts_per_connection", 16))))
    show = args.progress if args.progress is not None else sys.stderr.isatty() and len(parts) > 1
    progress = _Progress(sum(len(p) for p in parts), show)
    options: dict[str, Any] = {
        "voice_id": args.voice,
        "sample_rate": args.sample_rate,
        "encoding": encoding,
        "exaggeration": args.exaggeration,
        "cfg_weight": args.cfg_weight,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    pause = silence(PART_PAUSE_SECONDS, args.sample_rate, encoding)
    sink = _Sink(path, args.raw, args.sample_rate, encoding)
    pending: deque[tuple[SpeechContext, int]] = deque()
    audio_seconds = 0.0
    try:
        queued = 0
        while queued < len(parts) or pending:
            while queued < len(parts) and len(pending) < window:
                ctx = await client.open_context(parts[queued], **options)
                pending.append((ctx, len(parts[queued])))
                queued += 1
            ctx, chars = pending.popleft()
            async for chunk in ctx:
                # In a thread: a slow reader of stdout (a player) must not stop this loop from
                # reading the socket, or the sidecar would cut the connection as stalled.
                await asyncio.to_thread(sink.write, chunk.data)
                audio_seconds += chunk.duration
                progress.audio(chunk.duration)
            progress.advance(chars)
            if pending:
                await asyncio.to_thread(sink.write, pause)
                audio_seconds += PART_PAUSE_SECONDS
        sink.commit()
    except BaseException:
        sink.discard()  # the contexts still open end when the client closes the connection
        raise
    finally:
        progress.finish()
    if path is not None:
        print(
            f"wrote {path}: {audio_seconds:.2f} s of audio at {args.sample_rate} Hz",
            file=sys.stderr,
        )
    return EXIT_OK


async def cmd_voices_add(client: ChatterboxClient, args: argparse.Namespace) -> int:
    """Register a voice from a reference WAV file."""
    try:
        data = await asyncio.to_thread(Path(args.reference).read_bytes)
    except OSError as e:
        raise UsageError(f"cannot read {args.reference}: {e.strerror or e}") from e
    voice = await client.register_voice(args.name, data)
    info = client.info
    note = "" if info is None or info.can_clone else f"; the {info.engine} engine cannot speak it"
    channels = {1: "mono", 2: "stereo"}.get(voice.get("channels"), "")
    described = ", ".join(
        x
        for x in (
            f"{voice['duration_s']:.1f} s" if "duration_s" in voice else "",
            f"{voice['sample_rate']} Hz" if "sample_rate" in voice else "",
            channels,
        )
        if x
    )
    print(f"registered {args.name} ({described}){note}")
    return EXIT_OK


async def cmd_voices_list(client: ChatterboxClient, args: argparse.Namespace) -> int:
    """List the sidecar's voices."""
    voices = await client.list_voices()
    if args.json:
        print(json.dumps(voices, indent=2))
        return EXIT_OK
    rows = [("VOICE", "KIND", "USABLE", "SECONDS")]
    for v in voices:
        seconds = f"{v['duration_s']:.1f}" if "duration_s" in v else "-"
        usable = "yes" if v.get("usable") else "no"
        rows.append((str(v.get("voice_id")), str(v.get("kind", "")), usable, seconds))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


async def cmd_voices_delete(client: ChatterboxClient, args: argparse.Namespace) -> int:
    """Delete a registered voice."""
    await client.delete_voice(args.name)
    print(f"deleted {args.name}")
    return EXIT_OK


async def cmd_health(client: ChatterboxClient, args: argparse.Namespace) -> int:
    """Print the sidecar's health; exit 1 unless it is ready."""
    doc = await client.health()
    status = doc.get("status")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        line = (
            f"{status}: {doc.get('engine')} {doc.get('version')}, up {doc.get('uptime_s')} s, "
            f"{doc.get('active_contexts')} active contexts"
        )
        if doc.get("error"):
            line += f" (error: {doc['error']})"
        print(line)
    return EXIT_OK if status == "ready" else EXIT_ERROR


#
# Command line
#


def _rate(value: str) -> int:
    rate = int(value)
    if not 8000 <= rate <= 48000:
        raise argparse.ArgumentTypeError("must be from 8000 to 48000")
    return rate


def build_parser() -> argparse.ArgumentParser:
    """Returns: the command line parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Speak text and manage voices on a chatterbox TTS sidecar.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("TTS_URL") or DEFAULT_URL,
        help="the sidecar's websocket URL (TTS_URL; default %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TTS_API_KEY") or None,
        help="the sidecar's API key (TTS_API_KEY)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for a connection or answer"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log the protocol exchange")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    say = commands.add_parser(
        "say",
        help="speak text into a sound file or as raw PCM",
        description="Speak text. Long texts are spoken part by part with a progress bar.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    say.add_argument("text", help="the text to speak, or - to read it from stdin")
    say.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write a sound file (.wav, .flac, .ogg; 16-bit) or, with --raw, raw PCM",
    )
    say.add_argument(
        "--raw", action="store_true", help="write headerless PCM (to stdout unless -o is given)"
    )
    say.add_argument(
        "--encoding",
        choices=("s16le", "f32le", "mulaw"),
        default="s16le",
        help="the raw PCM encoding (default %(default)s)",
    )
    say.add_argument(
        "--sample-rate", type=_rate, default=24000, help="Hz, 8000-48000 (default %(default)s)"
    )
    say.add_argument("--voice", default=None, help="a registered voice (default: the engine's)")
    say.add_argument("--exaggeration", type=float, help="emotion intensity, 0-2 (chatterbox)")
    say.add_argument("--cfg-weight", type=float, help="guidance weight, 0-2 (chatterbox)")
    say.add_argument("--temperature", type=float, help="sampling temperature (chatterbox)")
    say.add_argument("--seed", type=int, help="seed for reproducible speech (chatterbox)")
    say.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: for long texts on a terminal)",
    )
    say.set_defaults(handler=cmd_say)

    voices = commands.add_parser("voices", help="register, list or delete cloned voices")
    voice_commands = voices.add_subparsers(dest="voices_command", required=True, metavar="ACTION")
    add = voice_commands.add_parser("add", help="register (or replace) a voice from a WAV file")
    add.add_argument("name", help="the voice id (letters, digits, '_' or '-')")
    add.add_argument("reference", help="a WAV recording of 3 to 30 seconds")
    add.set_defaults(handler=cmd_voices_add)
    listing = voice_commands.add_parser("list", help="list the voices")
    listing.add_argument("--json", action="store_true", help="print the sidecar's JSON")
    listing.set_defaults(handler=cmd_voices_list)
    delete = voice_commands.add_parser("delete", help="delete a voice")
    delete.add_argument("name", help="the voice id")
    delete.set_defaults(handler=cmd_voices_delete)

    health = commands.add_parser("health", help="show whether the sidecar is ready (exit 0 if so)")
    health.add_argument("--json", action="store_true", help="print the health document")
    health.set_defaults(handler=cmd_health)
    return parser


async def _run(args: argparse.Namespace) -> int:
    client = ChatterboxClient(
        args.url, args.api_key, open_timeout=args.timeout, request_timeout=args.timeout
    )
    try:
        return await args.handler(client, args)
    finally:
        await client.close()


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: The arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status (see ``--help``).
    """
    args = build_parser().parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "WARNING")
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except UsageError as e:
        return _fail(str(e), EXIT_USAGE)
    except BrokenPipeError:
        # stdout's reader went away (| head): nothing more to say, and nowhere to say it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except ConnectionError as e:  # ConnectionFailedError, ConnectionLostError
        return _fail(str(e), EXIT_UNREACHABLE)
    except ChatterboxError as e:
        return _fail(str(e), EXIT_ERROR)
    except TimeoutError:
        return _fail(f"the sidecar at {args.url} did not answer in {args.timeout:g} s", EXIT_ERROR)
    except ValueError as e:  # a URL that is not ws://...
        return _fail(str(e), EXIT_USAGE)
    except OSError as e:
        return _fail(f"{e}", EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(main())
