#!/usr/bin/env python3
"""Benchmark client for any running sidecar: continuity, time to first audio, real-time factor.

N concurrent websocket streams each synthesize utterances one after another (R rounds, or for
--seconds S per level). For every utterance it records the time from sending the text to the
first audio byte (client-side TTFA), the server's own ``ttfb_ms``, the audio duration, the
real-time factor (wall time over audio duration) and whether it would play without a gap.

Continuity (what the listener hears): playback starts when the first audio byte arrives and
runs at the sample rate; a byte that arrives after playback would have reached it makes the
player wait (an underrun), and playback resumes from there. An utterance is gap-free when no
underrun lasts more than 50 ms (``--gap-tolerance``). Per level the table gives the share of
gap-free utterances and the p95 / max of each utterance's longest gap.

    python scripts/bench_tts.py --url ws://localhost:8002/v1/stream/tts --streams 1,4,8 --seconds 60

Soak mode (--soak-clients N --soak-seconds M): N clients loop for M seconds with random cancels
and abrupt disconnects; it checks that every context ends in done, cancelled or a stated error
and that every done announces exactly the audio it delivered. Exit status 1 if not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
import uuid
from pathlib import Path

from websockets.asyncio.client import connect

TEXTS = [
    "Thanks for calling, how can I help you today?",
    "Your appointment is confirmed for Tuesday at three thirty in the afternoon.",
    "I can help with that. Let me pull up your account details for a moment.",
    "The total comes to forty two dollars and fifty cents, including tax.",
    "Is there anything else I can do for you before we hang up?",
]
# One short agent sentence per utterance (30-55 characters), as a voice agent speaks them.
AGENT_SENTENCES = [
    "Thanks for calling, how can I help you?",
    "Sure, let me check that for you right now.",
    "Your order shipped this morning.",
    "It should arrive by Thursday afternoon.",
    "Can I have your account number, please?",
    "I have booked you in for three thirty.",
    "Is there anything else I can help with?",
    "The total comes to forty two dollars.",
    "One moment while I pull up your details.",
    "Great, you are all set for tomorrow.",
]


def _long_text(limit: int = 1455) -> str:
    """About ``limit`` characters of agent replies (batch-mode benchmarks), whole sentences."""
    text = ""
    for sentence in (TEXTS + AGENT_SENTENCES) * 4:
        if len(text) + len(sentence) + 1 > limit:
            break
        text = f"{text} {sentence}".strip()
    return text


TEXT_SETS = {"agent": AGENT_SENTENCES, "replies": TEXTS, "long": [_long_text()]}
BYTES_PER_SAMPLE = {"pcm_f32le": 4, "pcm_s16le": 2, "pcm_mulaw": 1}
GAP_TOLERANCE_S = 0.05


def continuity(
    arrivals: list[tuple[float, int]],
    bytes_per_second: float,
    tolerance: float = GAP_TOLERANCE_S,
) -> dict:
    """How one utterance would play: underruns of a player that starts at the first byte.

    The player starts when the first byte arrives and plays at ``bytes_per_second``; when a
    frame arrives after the playhead would have reached its first byte, the player waits for
    it (an underrun as long as the frame was late) and then plays on from there.

    Args:
        arrivals: Per audio frame, in order: (arrival time in seconds, its size in bytes).
        bytes_per_second: Playback rate in bytes (sample rate x bytes per sample).
        tolerance: Underruns up to this long are not gaps a listener hears.

    Returns:
        ``longest_gap_s`` (the longest underrun, 0 if none), ``gaps`` (underruns longer than
        ``tolerance``), ``underrun_s`` (the time playback waited in all), ``gap_free``.
    """
    longest, stalled, gaps = 0.0, 0.0, 0
    if arrivals:
        start = arrivals[0][0]
        offset = 0
        for when, size in arrivals:
            due = start + stalled + offset / bytes_per_second
            late = when - due
            if late > 0:
                stalled += late
                longest = max(longest, late)
                gaps += late > tolerance
            offset += size
    return {
        "longest_gap_s": longest,
        "gaps": gaps,
        "underrun_s": stalled,
        "gap_free": longest <= tolerance,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def one_stream(
    args, stream_index: int, results: list[dict], deadline: float | None = None
) -> None:
    """Speak utterances back to back: ``args.rounds`` of them, or until ``deadline``."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    texts = TEXT_SETS[getattr(args, "texts", "agent")]
    rate = BYTES_PER_SAMPLE[args.encoding] * args.sample_rate
    async with connect(args.url, additional_headers=headers, max_size=None) as ws:
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready", ready
        r = 0
        while (r < args.rounds) if deadline is None else (time.perf_counter() < deadline):
            text = texts[(stream_index + r) % len(texts)]
            cid = f"s{stream_index}-r{r}-{uuid.uuid4().hex[:6]}"
            t0 = time.perf_counter()
            await ws.send(
                json.dumps(
                    {
                        "type": "synthesize",
                        "text": text,
                        "context_id": cid,
                        "sample_rate": args.sample_rate,
                        "encoding": args.encoding,
                        **(
                            {"streaming": args.streaming == "on"}
                            if args.streaming != "server"
                            else {}
                        ),
                    }
                )
            )
            first = None
            n_bytes = 0
            arrivals: list[tuple[float, int]] = []
            while True:
                frame = await ws.recv()
                if isinstance(frame, bytes):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    n_bytes += len(frame)
                    arrivals.append((now, len(frame)))
                    continue
                msg = json.loads(frame)
                if msg.get("context_id") != cid or msg["type"] == "started":
                    continue
                end = time.perf_counter()
                audio_s = n_bytes / BYTES_PER_SAMPLE[args.encoding] / args.sample_rate
                results.append(
                    {
                        "stream": stream_index,
                        "round": r,
                        "outcome": msg["type"],
                        "ttfa_ms": None if first is None else (first - t0) * 1000,
                        "server_ttfb_ms": msg.get("ttfb_ms"),
                        "audio_s": audio_s,
                        "wall_s": end - t0,
                        "rtf": (end - t0) / audio_s if audio_s else None,
                        "announced_audio_s": msg.get("audio_seconds"),
                        "started_at": t0,
                        "error_code": msg.get("code"),
                        **continuity(arrivals, rate, args.gap_tolerance),
                    }
                )
                break
            r += 1
            if msg["type"] == "error" and msg.get("code") == "busy":
                await asyncio.sleep(args.busy_backoff)


def summarize(results: list[dict], streams: int, wall: float) -> dict:
    """One level's figures from its utterances' records (see :func:`one_stream`)."""
    ok = [r for r in results if r["outcome"] == "done" and r["ttfa_ms"] is not None]
    ttfa = [r["ttfa_ms"] for r in ok]
    rtf = [r["rtf"] for r in ok]
    gaps = [r["longest_gap_s"] for r in ok]
    audio = sum(r["audio_s"] for r in ok)
    return {
        "streams": streams,
        "utterances": len(results),
        "ok": len(ok),
        "busy": sum(1 for r in results if r.get("error_code") == "busy"),
        "gap_free_share": sum(r["gap_free"] for r in ok) / len(ok) if ok else float("nan"),
        "longest_gap_p95_s": percentile(gaps, 0.95),
        "longest_gap_max_s": max(gaps) if gaps else float("nan"),
        "underrun_s_per_utterance": sum(r["underrun_s"] for r in ok) / len(ok)
        if ok
        else float("nan"),
        "ttfa_p50_ms": percentile(ttfa, 0.5),
        "ttfa_p95_ms": percentile(ttfa, 0.95),
        "server_ttfb_p50_ms": percentile(
            [r["server_ttfb_ms"] for r in ok if r["server_ttfb_ms"] is not None], 0.5
        ),
        "rtf_p50": percentile(rtf, 0.5),
        "rtf_max": max(rtf) if rtf else float("nan"),
        "audio_s_per_s": audio / wall if wall > 0 else float("nan"),
        "wall_s": wall,
    }


async def run_level(args, streams: int) -> dict:
    results: list[dict] = []
    started_at = time.time()
    t0 = time.perf_counter()
    deadline = t0 + args.seconds if args.seconds else None
    # Start times spread over the first ``--spread`` seconds (0: all at once).
    offsets = [args.spread * i / streams for i in range(streams)]

    async def stream(i: int) -> None:
        await asyncio.sleep(offsets[i])
        await one_stream(args, i, results, deadline)

    await asyncio.gather(*(stream(i) for i in range(streams)))
    wall = time.perf_counter() - t0
    for r in results:
        r["started_at"] -= t0
    level = summarize(results, streams, wall)
    level["started_at_epoch"] = started_at
    level["ended_at_epoch"] = time.time()
    level["raw"] = results
    return level


async def soak_client(args, index: int, deadline: float, stats: dict, rng) -> None:
    """Loop until the deadline: open contexts, sometimes cancel or vanish mid-stream."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    while time.perf_counter() < deadline:
        try:
            ws = await connect(args.url, additional_headers=headers, max_size=None)
        except Exception as e:  # refused at admission (503) counts, then retry
            stats["connect_refused"] += 1
            stats["refusals"].append(str(e)[:80])
            await asyncio.sleep(0.5)
            continue
        vanished = False
        try:
            json.loads(await ws.recv())
            while time.perf_counter() < deadline and not vanished:
                cid = f"k{index}-{uuid.uuid4().hex[:8]}"
                text = " ".join(rng.sample(TEXTS, rng.randint(1, 3)))
                action = rng.random()
                stats["opened"] += 1
                await ws.send(
                    json.dumps(
                        {
                            "type": "synthesize",
                            "text": text,
                            "context_id": cid,
                            "encoding": args.encoding,
                            "sample_rate": args.sample_rate,
                        }
                    )
                )
                n_bytes, got_audio, end = 0, False, None
                while end is None:
                    frame = await asyncio.wait_for(ws.recv(), args.context_timeout)
                    if isinstance(frame, bytes):
                        n_bytes += len(frame)
                        if not got_audio:
                            got_audio = True
                            if action < args.cancel_rate:
                                await ws.send(json.dumps({"type": "cancel", "context_id": cid}))
                            elif action < args.cancel_rate + args.disconnect_rate:
                                ws.transport.abort()  # vanish mid-stream, no close handshake
                                vanished = True
                                stats["abandoned"] += 1
                                break
                        continue
                    msg = json.loads(frame)
                    if msg.get("context_id") == cid and msg["type"] in (
                        "done",
                        "cancelled",
                        "error",
                    ):
                        end = msg
                if end is None:
                    continue
                outcome = end["type"] if end["type"] != "error" else f"error:{end['code']}"
                stats["outcomes"][outcome] = stats["outcomes"].get(outcome, 0) + 1
                if end["type"] == "done":
                    announced = end["audio_seconds"]
                    received = n_bytes / BYTES_PER_SAMPLE[args.encoding] / args.sample_rate
                    if abs(announced - received) > 1e-4:
                        stats["length_mismatches"] += 1
                if end["type"] == "error" and end["code"] == "busy":
                    await asyncio.sleep(0.2)
        except TimeoutError:
            stats["lost"] += 1  # a context that never ended
        except Exception as e:
            if not vanished:
                stats["connection_errors"].append(f"{type(e).__name__}: {e}"[:120])
        finally:
            await ws.close()


async def soak(args) -> int:
    import random

    rng = random.Random(args.seed)
    stats = {
        "opened": 0,
        "abandoned": 0,
        "lost": 0,
        "length_mismatches": 0,
        "connect_refused": 0,
        "outcomes": {},
        "connection_errors": [],
        "refusals": [],
    }
    deadline = time.perf_counter() + args.soak_seconds
    await asyncio.gather(
        *(
            soak_client(args, i, deadline, stats, random.Random(rng.random()))
            for i in range(args.soak_clients)
        )
    )
    ended = sum(stats["outcomes"].values())
    stats["ended"] = ended
    stats["unaccounted"] = stats["opened"] - ended - stats["abandoned"] - stats["lost"]
    stats["refusals"] = sorted(set(stats["refusals"]))[:5]
    print(json.dumps(stats, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "machine": platform.platform(),
                    "soak": stats,
                },
                indent=2,
            )
        )
    bad = (
        stats["lost"]
        or stats["length_mismatches"]
        or stats["unaccounted"]
        or stats["connection_errors"]
    )
    return 1 if bad else 0


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="ws://localhost:8002/v1/stream/tts")
    p.add_argument("--api-key", default=None)
    p.add_argument("--streams", default="1,4,8", help="comma-separated concurrency levels")
    p.add_argument("--rounds", type=int, default=5, help="utterances per stream")
    p.add_argument(
        "--seconds", type=float, default=0.0, help="speak for this long per level (0: --rounds)"
    )
    p.add_argument("--texts", default="agent", choices=sorted(TEXT_SETS))
    p.add_argument("--spread", type=float, default=1.0, help="start streams over this many s")
    p.add_argument("--gap-tolerance", type=float, default=GAP_TOLERANCE_S)
    p.add_argument("--busy-backoff", type=float, default=0.2, help="wait after a busy answer")
    p.add_argument("--pause", type=float, default=2.0, help="seconds between levels")
    p.add_argument("--sample-rate", type=int, default=24000)
    p.add_argument("--encoding", default="pcm_s16le", choices=sorted(BYTES_PER_SAMPLE))
    p.add_argument("--streaming", default="server", choices=["on", "off", "server"])
    p.add_argument("--warmup", type=int, default=1, help="utterances before measuring")
    p.add_argument("--json", type=Path, default=None, help="write raw results here")
    p.add_argument("--soak-clients", type=int, default=0, help="soak: N clients (0: benchmark)")
    p.add_argument("--soak-seconds", type=float, default=60.0, help="soak: how long")
    p.add_argument(
        "--cancel-rate", type=float, default=0.15, help="soak: share of contexts cancelled"
    )
    p.add_argument(
        "--disconnect-rate",
        type=float,
        default=0.05,
        help="soak: share of contexts whose client vanishes mid-stream",
    )
    p.add_argument(
        "--context-timeout",
        type=float,
        default=120.0,
        help="soak: a context with no end after this long counts as lost",
    )
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if args.soak_clients:
        return await soak(args)

    if args.warmup:
        warm = argparse.Namespace(**{**vars(args), "rounds": args.warmup})
        await one_stream(warm, 0, [])
    levels = []
    for n in args.streams.split(","):
        levels.append(await run_level(args, int(n)))
        await asyncio.sleep(args.pause)  # let the previous level's contexts end on the server
    print(
        f"{'streams':>7} {'ok':>9} {'gap-free':>8} {'gap p95':>8} {'gap max':>8} "
        f"{'TTFA p50':>9} {'TTFA p95':>9} {'srv p50':>8} {'RTF p50':>8} {'audio s/s':>9}"
    )
    for lv in levels:
        print(
            f"{lv['streams']:>7} {lv['ok']:>4}/{lv['utterances']:<4} "
            f"{100 * lv['gap_free_share']:>7.1f}% {lv['longest_gap_p95_s']:>7.2f}s "
            f"{lv['longest_gap_max_s']:>7.2f}s {lv['ttfa_p50_ms']:>7.0f}ms "
            f"{lv['ttfa_p95_ms']:>7.0f}ms {lv['server_ttfb_p50_ms']:>6.0f}ms "
            f"{lv['rtf_p50']:>8.3f} {lv['audio_s_per_s']:>9.2f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "url": args.url,
                    "machine": platform.platform(),
                    "cpu_count": __import__("os").cpu_count(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "levels": levels,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    asyncio.run(main())
