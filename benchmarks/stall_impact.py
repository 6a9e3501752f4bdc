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
import statistics
import tempfile
import time
from pathlib import Path

from chatterbox_sidecar.process import SidecarProcess
from websockets.asyncio.client import connect

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
    with tempfile.TemporaryDirectory() as tmp:
        env = {"TTS_STALL_SECONDS": args.stall_seconds, "TTS_LOG_LEVEL": "INFO"}
        sidecar = SidecarProcess(Path(tmp), env).start()
        try:
            alone, beside = asyncio.run(measure(sidecar.url, args.rounds))
            metrics = sidecar.get("/metrics")[1].decode()
        finally:
            sidecar.stop()
    for name, xs in (("alone", alone), ("beside a stalled client", beside)):
        q = statistics.quantiles(xs, n=20)
        print(f"{name:>24}: TTFA p50 {statistics.median(xs):6.0f} ms  p95 {q[18]:6.0f} ms")
    print(next(ln for ln in metrics.splitlines() if ln.startswith("tts_stalled_clients_total")))


if __name__ == "__main__":
    main()
