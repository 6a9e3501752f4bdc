"""The piper engine's worker process: espeak-ng phonemes and the onnxruntime voice.

Runs in a child process of the sidecar (see :mod:`chatterbox_sidecar.engines.workers`), because
espeak-ng can crash on some texts and must take down only the text that crashed it. Each job is
one text segment; the worker answers with its audio piece by piece.

Pieces: piper speaks one sentence per onnxruntime call, and memory grows with the audio of that
call (a 200-letter "A. B. C." run made one 62 s call that added 1.4 GB the allocator kept). So a
sentence's phonemes are cut at word boundaries into pieces of at most ``MAX_PHONEMES``. And when
a job ends with no other waiting, glibc's free heap pages go back to the system (``malloc_trim``):
without it a worker stayed 100-200 MiB above its start after a long text.

Word timings (a job that asks for them): the voice model is patched in memory, as piper-tts's
``include_alignments`` does, to also return how many audio frames each phoneme id lasts (its
duration predictor's output), so each phoneme's samples are exact. Which phonemes belong to
which word is planned from each word's phoneme count (espeak-ng on the word alone) and snapped to
the word breaks in the sentence's phonemes (espeak merges "of the" into one phoneme word, and a
spelled-out number may span several). Without the ``onnx`` package, or for a model with no
duration output, a piece's audio is shared out evenly over its phoneme ids instead (the stated
fallback: word starts good to a few hundred ms).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import unicodedata
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

MAX_PHONEMES = 200  # phonemes per onnxruntime call (~10-15 s of speech)
VOLUME = 0.9
WARM_UP_TEXT = "Ready."
SNAP_PHONEMES = 3  # a planned word start this close to a word break in the phonemes moves to it
_WORD = re.compile(r"\S+")
_COUNT_CACHE_SIZE = 20000

# (start_char, end_char, start_sample, end_sample) of one word of the segment, in one piece.
Span = tuple[int, int, int, int]


def _patched_model(model_path: Path) -> bytes | None:
    """The voice model with its phoneme durations as a second output, or None if not possible."""
    try:
        import onnx
        from piper.patch_voice_with_alignment import add_alignment_output
    except ImportError:
        return None
    model = onnx.load(str(model_path))
    try:
        add_alignment_output(model)
    except ValueError:  # no single duration tensor, or already an output: use the file
        return None
    return model.SerializeToString()


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc keeps them after a long piece)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        pass


def load_voice(model_path: Path, config: dict, alignments: bool = False):
    """Load a Piper voice for one worker (single-threaded onnxruntime, no memory arena).

    Args:
        model_path: The ``.onnx`` voice.
        config: Its ``.onnx.json`` configuration.
        alignments: Also output phoneme durations (needs the ``onnx`` package; without it,
            or for a model without them, the voice loads as is).

    Returns:
        The ``PiperVoice``.
    """
    import onnxruntime
    from piper.config import PiperConfig
    from piper.voice import PiperVoice

    options = onnxruntime.SessionOptions()
    # Several workers run at once (one per core); one thread each avoids oversubscription.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    # The arena keeps the peak of every call for the life of the process; without it the
    # memory of a long piece goes back to the system.
    options.enable_cpu_mem_arena = False
    model = (_patched_model(model_path) if alignments else None) or str(model_path)
    session = onnxruntime.InferenceSession(
        model, sess_options=options, providers=["CPUExecutionProvider"]
    )
    return PiperVoice(config=PiperConfig.from_dict(config), session=session)


def has_durations(voice) -> bool:
    """Returns: whether the voice's model outputs phoneme durations (exact word timings)."""
    return len(voice.session.get_outputs()) > 1


def split_phonemes(phonemes: list[str], limit: int = MAX_PHONEMES) -> list[list[str]]:
    """Cut one sentence's phonemes into pieces of at most ``limit``, at word boundaries.

    Args:
        phonemes: The sentence's phonemes (``" "`` between words).
        limit: Longest piece.

    Returns:
        The pieces, in order; a word longer than ``limit`` is cut inside.
    """
    pieces: list[list[str]] = []
    piece: list[str] = []
    word: list[str] = []
    for phoneme in [*phonemes, " "]:
        word.append(phoneme)
        if phoneme != " " and len(word) < limit:
            continue
        if len(piece) + len(word) > limit and piece:
            pieces.append(piece)
            piece = []
        piece.extend(word)
        word = []
    while piece and piece[-1] == " ":
        piece.pop()
    if piece:
        pieces.append(piece)
    return pieces


def _scaled(audio: np.ndarray) -> np.ndarray | None:
    """Peak-normalised float32 audio, or None for a silent piece."""
    peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
    if peak < 1e-8:
        return None
    return np.clip(audio / peak * VOLUME, -1.0, 1.0).astype(np.float32)


def synthesize(voice, text: str) -> Iterator[np.ndarray]:
    """Speak one segment, piece by piece.

    Args:
        voice: The loaded ``PiperVoice``.
        text: The segment.

    Yields:
        float32 mono audio at the voice's sample rate.
    """
    from piper.config import SynthesisConfig

    syn_config = SynthesisConfig(volume=VOLUME)
    for sentence in voice.phonemize(text):
        for piece in split_phonemes(sentence):
            audio = _scaled(voice.phoneme_ids_to_audio(voice.phonemes_to_ids(piece), syn_config))
            if audio is not None:
                yield audio


def _is_sound(phoneme: str) -> bool:
    """Whether a phoneme is spoken (not a word break or punctuation)."""
    return not phoneme.isspace() and unicodedata.category(phoneme[:1])[:1] != "P"


_counts: dict[str, int] = {}


def _sound_count(voice, word: str) -> int:
    """Spoken phonemes espeak-ng gives a word said on its own (cached)."""
    count = _counts.get(word)
    if count is None:
        count = sum(_is_sound(p) for sentence in voice.phonemize(word) for p in sentence)
        if len(_counts) >= _COUNT_CACHE_SIZE:
            _counts.clear()
        _counts[word] = count
    return count


def plan_words(voice, text: str, pieces: list[list[str]]) -> list[tuple[int, int, int, int]]:
    """Share out a segment's spoken phonemes among its words.

    Each word gets a run of the spoken phonemes in proportion to its own phoneme count (at
    least one if it has any), and its end moves to the nearest word break in the phonemes
    within ``SNAP_PHONEMES``, if one is past its start.

    Args:
        voice: The loaded ``PiperVoice``.
        text: The segment.
        pieces: Its phonemes, piece by piece, as they will be synthesized.

    Returns:
        ``(start_char, end_char, first, end)`` per word: its span in ``text`` and its run
        ``[first, end)`` of spoken phonemes, counted across the pieces (empty for a word with
        nothing to say).
    """
    words = [(m.start(), m.end(), m[0]) for m in _WORD.finditer(text)]
    breaks: list[int] = []  # spoken-phoneme indices that start a phoneme word
    total = 0
    for piece in pieces:
        after_break = True
        for phoneme in piece:
            if _is_sound(phoneme):
                if after_break:
                    breaks.append(total)
                total += 1
                after_break = False
            else:
                after_break = after_break or phoneme.isspace() or phoneme in ",.;:!?"
    counts = [_sound_count(voice, word) for _, _, word in words]
    wanted = sum(counts)
    bounds = [0]
    cum = 0
    for count in counts:
        cum += count
        at = bounds[-1]
        if count:  # a word with something to say ends at a break past its start, if one is near
            at = round(cum * total / wanted)
            near = [b for b in breaks if b > bounds[-1] and abs(b - at) <= SNAP_PHONEMES]
            if near:
                at = min(near, key=lambda b: (abs(b - at), b))
            at = max(at, bounds[-1] + 1)
        bounds.append(min(total, at))
    bounds[-1] = total
    return [(a, b, bounds[i], bounds[i + 1]) for i, (a, b, _) in enumerate(words)]


def _phoneme_ids(voice, piece: list[str]) -> tuple[list[int], list[int]]:
    """Phoneme ids of a piece (as piper builds them) and where each phoneme's ids start."""
    from piper.const import BOS, EOS, PAD

    id_map = voice.config.phoneme_id_map
    ids = [*id_map[BOS], *id_map[PAD]]
    starts = []
    for phoneme in piece:
        starts.append(len(ids))
        if phoneme in id_map:  # piper drops unknown phonemes too
            ids += [*id_map[phoneme], *id_map[PAD]]
    starts.append(len(ids))
    ids += id_map[EOS]
    return ids, starts


def synthesize_aligned(voice, text: str) -> Iterator[tuple[np.ndarray, list[Span]]]:
    """Speak one segment piece by piece, with when each of its words is spoken.

    Args:
        voice: The loaded ``PiperVoice`` (see :func:`load_voice`'s ``alignments``).
        text: The segment.

    Yields:
        ``(audio, spans)`` per piece: float32 mono audio (empty for a silent piece) and the
        words whose first phoneme is in the piece, as ``(start_char, end_char, start_sample,
        end_sample)`` in the piece's audio (the end is the piece's end for a word that runs
        on into the next piece).
    """
    from piper.config import PhonemeType, SynthesisConfig

    syn_config = SynthesisConfig(volume=VOLUME)
    pieces = [piece for sentence in voice.phonemize(text) for piece in split_phonemes(sentence)]
    plan = plan_words(voice, text, pieces)
    own_ids = voice.config.phoneme_type != PhonemeType.PINYIN
    durations = has_durations(voice)
    first_sound = 0  # index of the piece's first spoken phoneme among the segment's
    for n, piece in enumerate(pieces):
        if own_ids:
            ids, starts = _phoneme_ids(voice, piece)
        else:  # another id scheme: time the phonemes evenly
            ids = voice.phonemes_to_ids(piece)
            starts = [round(i * len(ids) / len(piece)) for i in range(len(piece) + 1)]
        audio, frames = (
            voice.phoneme_ids_to_audio(ids, syn_config, include_alignments=True)
            if durations
            else (voice.phoneme_ids_to_audio(ids, syn_config), None)
        )
        if frames is None or len(frames) != len(ids) or int(np.sum(frames)) != len(audio):
            frames = np.full(len(ids), len(audio) / max(1, len(ids)))  # the even fallback
        edges = np.concatenate([[0.0], np.cumsum(frames, dtype=np.float64)])
        # Sample range of each spoken phoneme of the piece, in order.
        sounds = [
            (int(edges[starts[j]]), int(edges[starts[j + 1]]))
            for j, phoneme in enumerate(piece)
            if _is_sound(phoneme)
        ]
        end_sound = first_sound + len(sounds)
        last_piece = n == len(pieces) - 1
        spans: list[Span] = []
        for start_char, end_char, first, end in plan:
            if first < end:
                if not first_sound <= first < end_sound:
                    continue
                start = sounds[first - first_sound][0]
                stop = sounds[end - 1 - first_sound][1] if end <= end_sound else len(audio)
            elif first_sound <= first < end_sound:  # nothing to say: where the next word starts
                start = stop = sounds[first - first_sound][0]
            elif last_piece and first >= end_sound:  # nothing to say, at the very end
                start = stop = sounds[-1][1] if sounds else len(audio)
            else:
                continue
            spans.append((start_char, end_char, start, stop))
        first_sound = end_sound
        scaled = _scaled(audio)
        yield (scaled if scaled is not None else np.zeros(0, dtype=np.float32)), spans


def serve(conn: Connection, model_path: Path, config: dict) -> None:
    """The worker's main loop: load, say ready, then answer jobs until told to stop.

    A job is ``(text, aligned)``: the segment, and whether to send word timings with the
    audio (items ``(audio, spans)`` from :func:`synthesize_aligned` rather than ``audio``).
    Ready is ``("ready", pid, has_durations)``.

    Args:
        conn: The pipe to the sidecar.
        model_path: The ``.onnx`` voice.
        config: Its configuration.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sidecar decides when workers stop
    try:
        voice = load_voice(model_path, config, alignments=True)
        for _ in synthesize_aligned(voice, WARM_UP_TEXT):
            pass
    except Exception as e:  # reported to the sidecar, which fails its start with it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid(), has_durations(voice)))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # the sidecar is gone
        if job is None:
            return
        text, aligned = job
        try:
            if aligned:
                for item in synthesize_aligned(voice, text):
                    conn.send(("item", item))
            else:
                for audio in synthesize(voice, text):
                    conn.send(("item", audio))
        except Exception as e:  # onnxruntime and espeak raise assorted types
            conn.send(("error", f"piper failed on a segment: {type(e).__name__}"))
            continue
        conn.send(("done",))
        if not conn.poll():
            _return_freed_memory()
