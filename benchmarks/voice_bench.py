"""Voice cloning through the sidecar: registration time, a new voice's first utterance, and
what registrations do to live streams (issue 13).

Starts one chatterbox sidecar (full-size random weights), then, in one run:

1. ``--streams`` clients speak agent sentences back to back for ``--seconds``
   (``scripts/bench_tts.py``): the gap-free share without registrations;
2. the same load again while ``--voices`` voices (references of 3-30 s, spread evenly) are
   registered over the websocket one after another: each registration's time, and the load's
   gap-free share with registrations;
3. with the load over, each new voice speaks one sentence, interleaved with the default voice:
   time to first audio and the longest gap of each, new voice against default.

    python benchmarks/voice_bench.py --out $OUT/voice_bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "sidecar"), str(ROOT / "plugin"), str(ROOT), str(ROOT / "scripts")]
sys.path.append(str(ROOT / "benchmarks"))

from bench_tts import AGENT_SENTENCES, continuity  # noqa: E402
from chatterbox_sidecar.process import SidecarProcess  # noqa: E402
from pipecat_chatterbox.client import ChatterboxClient  # noqa: E402
from voice_profile import synthetic_reference  # noqa: E402

RATE = 24_000


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def reference_wav(seconds: float, seed: int) -> bytes:
    """A distinct synthetic reference (pitch shifted by seed) as WAV bytes, 16 kHz."""
    wav = synthetic_reference(seconds) * (0.8 + 0.04 * seed)
    buf = io.BytesIO()
    sf.write(buf, wav, 16_000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def load(url: str, streams: int, seconds: float, out: Path) -> subprocess.Popen:
    """Start ``bench_tts.py`` speaking for ``seconds`` (continuity in its JSON)."""
    from gpu_bench import bench_tts_command

    command = bench_tts_command(url, str(streams), out, seconds=seconds)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def level_of(path: Path) -> dict:
    """A level's figures from bench_tts's JSON (per-utterance lists left out)."""
    level = json.loads(path.read_text())["levels"][0]
    return {k: v for k, v in level.items() if not isinstance(v, list | dict)}


async def utterance(client: ChatterboxClient, text: str, voice: str | None) -> dict:
    started = time.perf_counter()
    arrivals = []
    async for chunk in client.stream(text, voice_id=voice, encoding="pcm_f32le"):
        arrivals.append((time.perf_counter(), len(chunk.data)))
    return {
        "voice": voice or "default",
        "ttfa_ms": round(1000 * (arrivals[0][0] - started), 1),
        **continuity(arrivals, RATE * 4),
    }


async def run(args) -> dict:
    from gpu_bench import write_model

    model_dir = Path(args.model_dir)
    write_model(model_dir, 30 if args.device == "cuda" else 2, 10.0)
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    env = {
        "TTS_ENGINE": "chatterbox",
        "TTS_T3_BACKEND": "torch",
        "TTS_DEVICE": args.device,
        "TTS_FLOW_STEPS": str(args.flow_steps),
        "TTS_MODEL_DIR": str(model_dir),
        "TTS_ENGINE_CONCURRENCY": "64",
        "TTS_MAX_STREAMS": "64",
        "TTS_OVERLOAD_HOLD_SECONDS": "0",
        "TTS_LOG_LEVEL": "INFO",
        **dict(item.split("=", 1) for item in args.env),
    }
    workdir = out_dir / f"sidecar_voice_bench{args.name}"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sidecar = SidecarProcess(workdir, env).start(300)
    result: dict = {"start_s": round(time.perf_counter() - started, 1)}
    try:
        async with ChatterboxClient(sidecar.url) as client:
            for _ in range(3):  # warm-up
                await utterance(client, AGENT_SENTENCES[0], None)
            plain_raw = out_dir / f"voice_load_plain{args.name}.json"
            reg_raw = out_dir / f"voice_load_reg{args.name}.json"
            plain = load(sidecar.url, args.streams, args.seconds, plain_raw)
            await asyncio.to_thread(plain.wait)
            result["load_without_registrations"] = level_of(plain_raw)
            await asyncio.sleep(2)
            loaded = load(sidecar.url, args.streams, args.seconds, reg_raw)
            await asyncio.sleep(3)
            lengths = np.linspace(3, 30, args.voices)
            registrations = []
            for i, seconds in enumerate(lengths):
                wav = reference_wav(float(seconds), i)
                t0 = time.perf_counter()
                await client.register_voice(f"bench{i}", wav)
                took = time.perf_counter() - t0
                registrations.append({"reference_s": round(float(seconds), 1), "seconds": took})
                print(f"voice bench{i} ({seconds:.1f} s): registered in {took:.3f} s", flush=True)
                await asyncio.sleep(max(0.0, args.register_every - took))
            await asyncio.to_thread(loaded.wait)
            result["load_with_registrations"] = level_of(reg_raw)
            times = [r["seconds"] for r in registrations]
            result["registration"] = {
                "p50_s": pct(times, 50),
                "max_s": round(max(times), 3),
                "raw": registrations,
            }
            firsts = []
            for i in range(args.voices):
                text = AGENT_SENTENCES[i % len(AGENT_SENTENCES)]
                firsts.append(await utterance(client, text, f"bench{i}"))
                firsts.append(await utterance(client, text, None))
            new = [f for f in firsts if f["voice"] != "default"]
            default = [f for f in firsts if f["voice"] == "default"]
            result["first_utterance"] = {
                "new_voice_ttfa_p50_ms": pct([f["ttfa_ms"] for f in new], 50),
                "new_voice_ttfa_max_ms": max(f["ttfa_ms"] for f in new),
                "default_ttfa_p50_ms": pct([f["ttfa_ms"] for f in default], 50),
                "default_ttfa_max_ms": max(f["ttfa_ms"] for f in default),
                "new_voice_gap_free_share": sum(f["gap_free"] for f in new) / len(new),
                "new_voice_longest_gap_max_s": max(f["longest_gap_s"] for f in new),
                "raw": firsts,
            }
    finally:
        sidecar.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="/tmp/cbx-bench")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--voices", type=int, default=10)
    parser.add_argument("--register-every", type=float, default=3.0)
    parser.add_argument("--device", default="cuda", help="cpu: check the script, tiny model")
    parser.add_argument("--flow-steps", type=int, default=10)
    parser.add_argument("--out", required=True)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the sidecar")
    parser.add_argument("--name", default="", help="suffix of the raw files (several runs)")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    result["command"] = " ".join(sys.argv)
    result["env"] = args.env
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "first_utterance"}, indent=1))
    print(json.dumps({k: v for k, v in result["first_utterance"].items() if k != "raw"}))


if __name__ == "__main__":
    main()
