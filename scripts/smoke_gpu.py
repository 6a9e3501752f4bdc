#!/usr/bin/env python3
"""Smoke check of a real GPU deployment: real weights, real words, time to first audio.

Starts the sidecar with the chatterbox engine (weights from TTS_MODEL_DIR, else downloaded once
from the Hugging Face Hub), synthesizes a few sentences over protocol v1 in streaming and batch
mode, checks with Whisper tiny.en that the audio says the words (WER <= 0.2), and prints the time
to first audio. Exit status 0 when every check passes.

    scripts/smoke_gpu.sh                      # chatterbox engine, backend chosen by TTS_T3_BACKEND
    python scripts/smoke_gpu.py --engine piper   # the same checks against the CPU engine
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from chatterbox_sidecar.process import SidecarProcess
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please hold while I transfer you to the billing department.",
    "Your package will arrive on Thursday before noon.",
]


async def speak(url: str, text: str, streaming: bool) -> tuple[float, np.ndarray, dict]:
    async with connect(url, max_size=None) as ws:
        json.loads(await ws.recv())
        t0 = time.perf_counter()
        await ws.send(
            json.dumps(
                {
                    "type": "synthesize",
                    "text": text,
                    "context_id": "smoke",
                    "streaming": streaming,
                    "encoding": "pcm_f32le",
                    "seed": 1,
                }
            )
        )
        first, chunks = None, []
        while True:
            frame = await ws.recv()
            if isinstance(frame, bytes):
                first = first or time.perf_counter()
                chunks.append(frame)
                continue
            msg = json.loads(frame)
            if msg["type"] in ("done", "error", "cancelled"):
                audio = np.frombuffer(b"".join(chunks), dtype="<f4")
                ttfa = (first - t0) * 1000 if first else float("nan")
                return ttfa, audio, msg


async def run_checks(url: str) -> bool:
    from tests.asr import transcribe, word_error_rate

    ok = True
    for streaming in (True, False):
        ttfas = []
        for text in SENTENCES:
            ttfa, audio, end = await speak(url, text, streaming)
            if end["type"] != "done":
                print(f"FAIL {text!r}: {end}")
                ok = False
                continue
            heard = transcribe(audio, 24000)
            wer = word_error_rate(text, heard)
            ttfas.append(ttfa)
            verdict = "ok  " if wer <= 0.2 else "FAIL"
            ok &= wer <= 0.2
            print(
                f"{verdict} streaming={streaming!s:5} ttfa={ttfa:6.0f} ms "
                f"audio={len(audio) / 24000:5.2f} s wer={wer:.2f} heard={heard!r}"
            )
        if ttfas:
            print(
                f"     streaming={streaming}: time to first audio median "
                f"{statistics.median(ttfas):.0f} ms (first request included)"
            )
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engine", default="chatterbox", choices=["chatterbox", "piper"])
    p.add_argument("--load-timeout", type=float, default=1800, help="seconds (first download)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "TTS_ENGINE": args.engine,
            "TTS_VOICES_DIR": os.environ.get("TTS_VOICES_DIR", f"{tmp}/voices"),
            "TTS_LOG_LEVEL": os.environ.get("TTS_LOG_LEVEL", "INFO"),
        }
        sidecar = SidecarProcess(Path(tmp), env, echo=True)
        print(f"starting the sidecar (engine={args.engine}) on port {sidecar.port} ...", flush=True)
        t0 = time.perf_counter()
        try:
            sidecar.start(args.load_timeout)
        except (RuntimeError, TimeoutError) as e:
            raise SystemExit(f"the sidecar did not start: {e}") from e
        try:
            print(f"ready after {time.perf_counter() - t0:.1f} s", flush=True)
            ok = asyncio.run(run_checks(sidecar.url))
        finally:
            sidecar.stop()
    print("SMOKE TEST PASSED" if ok else "SMOKE TEST FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
