#!/usr/bin/env python3
"""Chatterbox models side by side through the websocket (issue 16): Original, Turbo, Multilingual.

Writes full-size random checkpoints in each model's real layout (the Original's with
``gpu_bench.write_model``; Turbo's: a 24-layer GPT-2 medium T3 and the meanflow S3Gen, beside
the Original's voice encoder and ``conds.pt``; Multilingual's: the Original's 30-layer T3 with
its 2454-token text vocabulary and the real tokenizer, beside the Original's S3Gen), then runs
``gpu_bench.server_section`` (one sidecar, ``scripts/bench_tts.py`` at each level: gap-free
share, TTFA, GPU busy) for each model in turn, in the same run, with the same client. Random
weights never stop by themselves, so every utterance speaks the engine's token budget for its
text, the same for every model. Each model's result also holds the capacity its engine
calibrated at start (the sidecar log's calibration line).

    python benchmarks/model_bench.py --levels 1,4,16 --seconds 25 --out $OUT/models.json
    python benchmarks/model_bench.py --models chatterbox-turbo,chatterbox \
        --levels-of chatterbox-turbo=16,24,32,64 --levels-of chatterbox=4,8,16
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT), str(ROOT / "sidecar")]

from gpu_bench import server_section, write_model  # noqa: E402

# GPT-2 medium, Turbo's T3 backbone (upstream tts_turbo.py: "GPT2_medium")
TURBO_T3 = {"n_layers": 24, "hidden": 1024, "intermediate": 4096}


def write_turbo(folder: Path, original: Path) -> float:
    """Turbo's folder at full size beside the Original's; returns the seconds it took."""
    from tests.chatterbox.turbo_checkpoint import write_turbo_model_dir

    started = time.time()
    if not (folder / "t3_turbo_v1.safetensors").exists():
        write_turbo_model_dir(folder, original, **TURBO_T3)
    return time.time() - started


def write_multilingual(folder: Path, original: Path) -> float:
    """Multilingual's folder at full size beside the Original's; returns the seconds it took."""
    from tests.chatterbox.mtl_checkpoint import T3_FILE, write_mtl_model_dir

    started = time.time()
    if not (folder / T3_FILE).exists():
        write_mtl_model_dir(folder, original, None, n_layers=30)
    return time.time() - started


def calibration(log: Path) -> dict | None:
    """The engine's calibration at start, from the sidecar's log (None if it has none)."""
    if not log.is_file():
        return None
    marker = ": calibration "
    for line in log.read_text(errors="replace").splitlines():
        if marker in line:
            return ast.literal_eval(line.split(marker, 1)[1].strip())
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "models.json")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/cbx-bench"))
    p.add_argument("--turbo-dir", type=Path, default=Path("/tmp/cbx-turbo"))
    p.add_argument("--models", default="chatterbox-turbo,chatterbox")
    p.add_argument("--mtl-dir", type=Path, default=Path("/tmp/cbx-mtl"))
    p.add_argument("--levels", default="1,4,16")
    p.add_argument(
        "--levels-of",
        action="append",
        default=[],
        metavar="MODEL=LEVELS",
        help="one model's own levels (repeatable), e.g. chatterbox-turbo=16,32,64",
    )
    p.add_argument("--seconds", type=float, default=25.0)
    p.add_argument("--timeout", type=float, default=200.0, help="each model's levels")
    args = p.parse_args()

    models = args.models.split(",")
    levels = {model: args.levels for model in models}
    levels.update(item.split("=", 1) for item in args.levels_of)
    result: dict = {"command": " ".join(sys.argv), "levels": levels}
    result["written_s"] = {"chatterbox": round(write_model(args.model_dir, 30, 10.0), 1)}
    folders = {"chatterbox": args.model_dir}
    if "chatterbox-turbo" in models:
        seconds = write_turbo(args.turbo_dir, args.model_dir)
        result["written_s"]["chatterbox-turbo"] = round(seconds, 1)
        folders["chatterbox-turbo"] = args.turbo_dir
    if "chatterbox-multilingual" in models:
        seconds = write_multilingual(args.mtl_dir, args.model_dir)
        result["written_s"]["chatterbox-multilingual"] = round(seconds, 1)
        folders["chatterbox-multilingual"] = args.mtl_dir
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    for model in models:
        name = model.replace("-", "_")
        print(f"=== {model}", flush=True)
        try:
            result[model] = server_section(
                folders[model],
                levels[model],
                rounds=0,
                timeout=args.timeout,
                compile_flow=False,
                seconds=args.seconds,
                # TTS_FLOW_STEPS=0: the model's own (Turbo's meanflow 2, the Original's 10)
                extra_env={"TTS_MODEL": model, "TTS_FLOW_STEPS": "0"},
                name=name,
            )
        except Exception as e:  # one model failing still measures the others
            print(f"{model}: {type(e).__name__}: {e}", flush=True)
            result[model] = {"error": f"{type(e).__name__}: {e}"}
        result[model]["calibration"] = calibration(out_dir / f"sidecar_{name}" / "logs" / "tts.log")
        print(f"{model}: calibration {result[model]['calibration']}", flush=True)
        args.out.write_text(json.dumps(result, indent=1))
    print("=== summary", flush=True)
    for model in models:
        print(
            f"{model:17} calibrated capacity {(result[model]['calibration'] or {}).get('capacity')}"
        )
        for lv in result[model].get("levels", []):
            print(
                f"{model:17} {lv['streams']:>3} streams: "
                f"gap-free {100 * lv['gap_free_share']:.1f} %"
                f", gap p95 {lv['longest_gap_p95_s']:.2f} s, TTFA p50/p95 "
                f"{lv['ttfa_p50_ms']:.0f}/{lv['ttfa_p95_ms']:.0f} ms, RTF {lv['rtf_p50']:.2f}, "
                f"audio {lv['audio_s_per_s']:.1f} s/s, GPU busy {lv.get('gpu_busy_mean_pct')} %",
                flush=True,
            )


if __name__ == "__main__":
    main()
