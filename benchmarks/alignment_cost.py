"""What recording T3's alignment heads (word timestamps, issue 17) costs a decode step.

Builds the torch backend's decoder on a random T3 checkpoint in the real layout (by default the
full-size 30-layer Llama-520M, bfloat16 on CUDA) and measures, for each number of requests and
attended cache length:

- ``graph``: one decode step's device time, replaying the plain CUDA graph and its twin that
  records the three alignment heads (CUDA events, ``--repeats`` replays each). On CPU, or with
  ``--no-graphs``, the eager step instead (``decode_and_sample`` with and without ``align``).
- ``step``: the whole ``T3BatchDecoder.step()`` as the decode thread runs it (graph or eager,
  sampling, the host read of the tokens and, for aligned requests, the copy of their rows to
  the host), with every request asking for alignment against none asking.
- ``prefill``: one prefill pass of ``rows`` prompts, with and without the recording (prefill
  graphs always record when the decoder aligns; this says what that costs).

Usage on the GPU machine (about a minute after the checkpoint is written)::

    python benchmarks/alignment_cost.py --out $OUT/alignment_cost.json

CPU check of the script (tiny model, seconds)::

    python benchmarks/alignment_cost.py --device cpu --layers 2 --hidden 256 \\
        --intermediate 512 --requests 1,2 --kv-lens 256 --repeats 3 --steps 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "sidecar"), str(ROOT)]

from chatterbox_sidecar.engines.chatterbox.t3.backend import T3Request  # noqa: E402
from chatterbox_sidecar.engines.chatterbox.t3.model import T3Model  # noqa: E402
from chatterbox_sidecar.engines.chatterbox.t3.text import T3Tokenizer  # noqa: E402
from chatterbox_sidecar.engines.chatterbox.t3.torch_backend import (  # noqa: E402
    T3BatchDecoder,
    _PrefillGraph,
    resolve_dtype,
)

TEXT = "Thank you for calling the city library, our opening hours are nine to five today."


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn`` (after one untimed call); CUDA events on a GPU."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - began))
    return sorted(times)[len(times) // 2]


def conds(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "speaker_emb": torch.randn(1, 256, generator=gen),
        "cond_prompt_speech_tokens": torch.randint(0, 6561, (1, 150), generator=gen),
    }


def pair(plain: float, aligned: float) -> dict:
    return {
        "plain_ms": round(plain, 4),
        "aligned_ms": round(aligned, 4),
        "extra_ms": round(aligned - plain, 4),
        "extra_pct": round(100 * (aligned - plain) / plain, 2) if plain else None,
    }


def decode_step(
    decoder: T3BatchDecoder, inputs: torch.Tensor, kv_len: int, align: bool, graphs: bool
) -> Callable[[], object]:
    """One decode step over ``inputs``' rows: the captured graph, or the eager step."""
    graph = decoder._graph_for(inputs.shape[1], kv_len, align) if graphs else None
    if graph is not None:
        return lambda: graph.run(inputs)
    return lambda: decoder.decode_and_sample(inputs, kv_len, align=align)


def prefill_passes(
    decoder: T3BatchDecoder, embeds: torch.Tensor, lengths: torch.Tensor, graphs: bool
) -> list[Callable[[], object]]:
    """A prefill pass of ``embeds`` without, then with, the alignment recording."""
    rows, length = embeds.shape[:2]
    slots = torch.arange(rows, device=embeds.device)
    align = decoder._align
    if not graphs:
        model = decoder.model
        return [
            lambda: model.prefill(embeds, decoder.cache, slots, lengths),
            lambda: model.prefill(embeds, decoder.cache, slots, lengths, align),
        ]
    pool = torch.cuda.graph_pool_handle()
    with_align = _PrefillGraph(decoder, rows, length, pool)
    decoder._align = None  # a graph captured as a decoder without alignment would
    try:
        without = _PrefillGraph(decoder, rows, length, pool)
    finally:
        decoder._align = align
    return [
        lambda: without.run(embeds, slots, lengths),
        lambda: with_align.run(embeds, slots, lengths),
    ]


def graph_section(decoder: T3BatchDecoder, args, device: torch.device) -> list[dict]:
    out = []
    for requests in args.requests:
        rows = decoder.decode_rows(requests)
        for kv_len in args.kv_lens:
            inputs = torch.zeros(3, rows, dtype=torch.long, device=device)
            inputs[2] = kv_len - 1  # every row attends over the whole length
            times = [
                timed(decode_step(decoder, inputs, kv_len, a, args.graphs), device, args.repeats)
                for a in (False, True)
            ]
            out.append({"requests": requests, "rows": rows, "kv_len": kv_len, **pair(*times)})
            print(f"graph   {requests:3d} requests, kv {kv_len:4d}: {out[-1]}")
    return out


def step_section(decoder: T3BatchDecoder, args, device: torch.device) -> list[dict]:
    out = []
    for requests in args.requests:
        times = []
        for align in (False, True):
            batch = [
                T3Request(
                    f"{align}-{requests}-{i}",
                    TEXT,
                    conds(i),
                    seed=i,
                    max_new_tokens=args.steps + 2,
                    alignment=align,
                )
                for i in range(requests)
            ]
            decoder.add_batch(batch)
            decoder.step()  # one untimed
            began = time.perf_counter()
            steps = 0
            while decoder.active_ids and steps < args.steps:
                decoder.step()
                steps += 1
            times.append(1000 * (time.perf_counter() - began) / max(steps, 1))
            for request_id in decoder.active_ids:
                decoder.remove(request_id)
        out.append({"requests": requests, **pair(*times)})
        print(f"step    {requests:3d} requests: {out[-1]}")
    return out


def prefill_section(decoder: T3BatchDecoder, args, device: torch.device) -> list[dict]:
    model = decoder.model
    length = 64 * -(-(model.config.conditioning_len + len(TEXT) + 4) // 64)
    out = []
    for requests in args.requests:
        rows = min(decoder.decode_rows(requests), decoder.n_slots)
        embeds = torch.randn(rows, length, model.config.hidden_size, device=device)
        embeds = embeds.to(model.dtype)
        lengths = torch.full((rows,), length, dtype=torch.long, device=device)
        runs = prefill_passes(decoder, embeds, lengths, args.graphs)
        times = [timed(run, device, args.repeats) for run in runs]
        out.append({"requests": requests, "rows": rows, "length": length, **pair(*times)})
        print(f"prefill {requests:3d} requests ({rows} rows x {length}): {out[-1]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="T3 dtype (default: bf16 CUDA, fp32 CPU)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--requests", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 8, 16])  # fmt: skip
    parser.add_argument("--kv-lens", type=lambda s: [int(x) for x in s.split(",")],
                        default=[256, 512, 1024])  # fmt: skip
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--steps", type=int, default=40, help="timed step() calls per level")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse a written T3")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.graphs = args.graphs and device.type == "cuda"
    from tests.chatterbox.t3_checkpoint import write_random_t3_checkpoint

    with contextlib.ExitStack() as stack:
        model_dir = args.model_dir
        if model_dir is None or not (model_dir / "t3_cfg.safetensors").exists():
            model_dir = model_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            started = time.perf_counter()
            write_random_t3_checkpoint(
                model_dir, args.layers, 0, hidden=args.hidden, intermediate=args.intermediate
            )
            print(f"wrote a random T3 in {time.perf_counter() - started:.1f} s")
        max_seq_len = max(args.kv_lens)
        model = T3Model.from_safetensors(
            model_dir / "t3_cfg.safetensors",
            device=device,
            dtype=resolve_dtype(args.dtype, device),
            max_positions=max_seq_len,
        )
        decoder = T3BatchDecoder(
            model,
            T3Tokenizer(model_dir / "tokenizer.json"),
            max_batch_size=max(args.requests),
            max_seq_len=max_seq_len,
        )
        with torch.inference_mode():
            if args.graphs:
                started = time.perf_counter()
                decoder.capture_graphs()
                print(f"captured graphs in {time.perf_counter() - started:.1f} s")
            result = {
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__,
                "layers": model.config.n_layers,
                "hidden": model.config.hidden_size,
                "dtype": str(model.dtype),
                "heads": decoder._align.heads if decoder._align is not None else None,
                "graphs": args.graphs,
                "graph": graph_section(decoder, args, device),
                "step": step_section(decoder, args, device),
                "prefill": prefill_section(decoder, args, device),
            }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
