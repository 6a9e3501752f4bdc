"""Where a voice registration's time goes: each stage of ``compute_conditionals`` timed.

Loads S3Gen and the voice encoder (full-size architecture, random weights from
``gpu_bench.write_model``) on the device, then computes the conditionals of a synthetic
reference (``--seconds`` of a voiced-like signal at 16 kHz) ``--rounds`` times. Each stage is
timed with the device synchronised around it (resampling, the S3Gen reference mel, the x-vector,
the S3 tokenizer inside ``embed_ref``, the T3 prompt tokens, the voice encoder, the file write);
the first round is also run under cProfile (its top functions by cumulative time).

    python benchmarks/voice_profile.py --seconds 10 --rounds 4 --out $OUT/voice_profile.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "sidecar"), str(ROOT), str(ROOT / "benchmarks")]

from chatterbox_sidecar.engines.chatterbox import conditionals as conds_mod  # noqa: E402
from chatterbox_sidecar.engines.chatterbox.s3gen.loader import (  # noqa: E402
    S3GEN_FILE,
    VE_FILE,
    load_s3gen,
    load_voice_encoder,
)


class StageTimer:
    """Wraps callables so that each call's wall time (device synchronised) is recorded."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.times: dict[str, list[float]] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def wrap(self, obj, name: str, key: str) -> None:
        original = getattr(obj, name)

        def wrapped(*args, **kwargs):
            self.sync()
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.sync()
                self.times.setdefault(key, []).append(time.perf_counter() - started)

        setattr(obj, name, wrapped)


def synthetic_reference(seconds: float, sr: int = 16_000) -> np.ndarray:
    """A voiced-like test signal: a gliding harmonic tone with syllable-rate amplitude."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    wav = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.2 * wav * envelope).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="/tmp/cbx-bench")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model_dir = Path(args.model_dir)
    from gpu_bench import write_model

    write_model(model_dir, 30 if args.device != "cpu" else 2, 10.0)
    started = time.perf_counter()
    s3gen = load_s3gen(model_dir / S3GEN_FILE, args.device, torch.float32)
    ve = load_voice_encoder(model_dir / VE_FILE, args.device)
    result: dict = {"load_s": round(time.perf_counter() - started, 2), "device": args.device}
    timer = StageTimer(args.device)
    timer.wrap(conds_mod, "resample", "resample (soxr, host)")
    timer.wrap(s3gen, "embed_ref", "embed_ref (total)")
    timer.wrap(s3gen.mel_extractor, "__call__", "  embed_ref: mel 24 kHz")
    timer.wrap(s3gen.speaker_encoder, "inference", "  embed_ref: x-vector (CAMPPlus)")
    timer.wrap(s3gen.tokenizer, "forward", "S3 tokenizer (embed_ref's and T3 prompt's)")
    timer.wrap(ve, "embeds_from_wavs", "voice encoder")
    wav = synthetic_reference(args.seconds)
    rounds = []
    profile_text = ""
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            timer.times.clear()
            profiler = cProfile.Profile() if r == 0 else None
            t0 = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            conds = conds_mod.compute_conditionals(wav, 16_000, s3gen, ve)
            timer.sync()
            t1 = time.perf_counter()
            conds.save(Path(tmp) / f"conds{r}.pt")
            t2 = time.perf_counter()
            if profiler is not None:
                profiler.disable()
                buf = io.StringIO()
                pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(30)
                profile_text = buf.getvalue()
            rounds.append(
                {
                    "total_s": round(t2 - t0, 3),
                    "compute_s": round(t1 - t0, 3),
                    "save_s": round(t2 - t1, 4),
                    "stages_s": {k: round(sum(v), 4) for k, v in timer.times.items()},
                    "calls": {k: len(v) for k, v in timer.times.items()},
                }
            )
            print(json.dumps(rounds[-1]), flush=True)
    result["reference_seconds"] = args.seconds
    result["rounds"] = rounds
    result["first_round_profile"] = profile_text
    result["command"] = " ".join(sys.argv)
    if args.device != "cpu":
        result["card"] = torch.cuda.get_device_name()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(profile_text[:6000])


if __name__ == "__main__":
    main()
