#!/usr/bin/env python3
"""Time to first audio of a normal client with and without a stalled client beside it (issue 7).

Starts its own piper sidecar, measures a client's TTFA over N utterances alone, then again while
another client has asked for a long text and reads nothing (it is cut off after
TTS_STALL_SECONDS), and prints both, with the stalled-client count from /metrics.

    python benchmarks/stall_impact.py --rounds 40 --stall-seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port  # noqa: E402

TEXT = "Thanks for calling, how can I help you today?"
LONG = " ".join(f"Sentence {i} of a long answer that nobody is listening to." for i in range(80))


async def ttfa_run(url: str, rounds: int) -> list[float]:
    out = []
    async with connect(url, max_size=None) as ws:
        await ws.recv()
        for r in range(rounds):
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "synthesize", "text": TEXT, "context_id": f"r{r}"}))
            first = None
            while True:
                frame = await ws.recv()
                if isinstance(frame, bytes):
                    first = first or time.perf_counter()
                elif json.loads(frame)["type"] == "done":
                    break
            out.append((first - t0) * 1000)
    return out


async def measure(url: str, rounds: int) -> tuple[list[float], list[float]]:
    await ttfa_run(url, 2)  # warm-up
    alone = await ttfa_run(url, rounds)
    async with connect(url, max_queue=2) as stalled:  # reads nothing from here on
        await stalled.send(json.dumps({"type": "synthesize", "text": LONG, "context_id": "s"}))
        beside = await ttfa_run(url, rounds)
    return alone, beside


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--stall-seconds", default="2")
    args = p.parse_args()
    port = free_port()
    env = {
        **os.environ,
        "TTS_ENGINE": "piper",
        "TTS_HOST": "127.0.0.1",
        "TTS_PORT": str(port),
        "TTS_STALL_SECONDS": args.stall_seconds,
        "TTS_LOG_DIR": "/tmp/stall-impact-logs",
        "TTS_VOICES_DIR": "/tmp/stall-impact-voices",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatterbox_sidecar"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        alone, beside = asyncio.run(measure(f"ws://127.0.0.1:{port}/v1/stream/tts", args.rounds))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    finally:
        proc.terminate()
        proc.wait(30)
    for name, xs in (("alone", alone), ("beside a stalled client", beside)):
        q = statistics.quantiles(xs, n=20)
        print(f"{name:>24}: TTFA p50 {statistics.median(xs):6.0f} ms  p95 {q[18]:6.0f} ms")
    print(next(ln for ln in metrics.splitlines() if ln.startswith("tts_stalled_clients_total")))


if __name__ == "__main__":
    main()
