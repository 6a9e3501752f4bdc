"""The piper engine's worker process: espeak-ng phonemes and the onnxruntime voice.

Runs in a child process of the sidecar (see :mod:`chatterbox_sidecar.engines.workers`), because
espeak-ng can crash on some texts and must take down only the text that crashed it. Each job is
one text segment; the worker answers with its audio piece by piece.

Pieces: piper speaks one sentence per onnxruntime call, and memory grows with the audio of that
call (a 200-letter "A. B. C." run made one 62 s call that added 1.4 GB the allocator kept). So a
sentence's phonemes are cut at word boundaries into pieces of at most ``MAX_PHONEMES``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

MAX_PHONEMES = 200  # phonemes per onnxruntime call (~10-15 s of speech)
VOLUME = 0.9
WARM_UP_TEXT = "Ready."


def load_voice(model_path: Path, config: dict):
    """Load a Piper voice for one worker (single-threaded onnxruntime, no memory arena).

    Args:
        model_path: The ``.onnx`` voice.
        config: Its ``.onnx.json`` configuration.

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
    session = onnxruntime.InferenceSession(
        str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return PiperVoice(config=PiperConfig.from_dict(config), session=session)


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
            audio = voice.phoneme_ids_to_audio(voice.phonemes_to_ids(piece), syn_config)
            peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
            if peak < 1e-8:
                continue
            yield np.clip(audio / peak * VOLUME, -1.0, 1.0).astype(np.float32)


def serve(conn: Connection, model_path: Path, config: dict) -> None:
    """The worker's main loop: load, say ready, then answer jobs until told to stop.

    Args:
        conn: The pipe to the sidecar.
        model_path: The ``.onnx`` voice.
        config: Its configuration.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sidecar decides when workers stop
    try:
        voice = load_voice(model_path, config)
        for _ in synthesize(voice, WARM_UP_TEXT):
            pass
    except Exception as e:  # reported to the sidecar, which fails its start with it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # the sidecar is gone
        if job is None:
            return
        try:
            for audio in synthesize(voice, job):
                conn.send(("item", audio))
        except Exception as e:  # onnxruntime and espeak raise assorted types
            conn.send(("error", f"piper failed on a segment: {type(e).__name__}"))
            continue
        conn.send(("done",))
