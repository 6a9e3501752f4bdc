"""The torch T3 backend on a CUDA GPU (skipped without one): same checks as on CPU, plus full size.

Run on a GPU machine with ``pytest tests/chatterbox/test_t3_cuda.py -s`` (``-s`` shows the
decode-step timings of the full-size 30-layer model in bfloat16).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from chatterbox_sidecar.engines.chatterbox.t3.model import T3Model
from chatterbox_sidecar.engines.chatterbox.t3.text import T3Tokenizer
from chatterbox_sidecar.engines.chatterbox.t3.torch_backend import T3BatchDecoder, TorchT3Backend

from .t3_checkpoint import write_random_t3_checkpoint
from .test_t3_torch import make_conds, reference_logits, request, run_decoder

pytestmark = [
    pytest.mark.torch,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    # The S3Gen decoder turns TF32 on for the whole process when it is built on CUDA (its
    # float32 encoder and vocoder); the float32 reference comparisons here need full float32.
    # On the H200 (2026-11-30), after the S3Gen CUDA tests, one logit of 8194 was 2.2e-3 off.
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_t3_checkpoint(tmp_path_factory.mktemp("t3f"), n_layers=30, seed=0)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_t3_checkpoint(tmp_path_factory.mktemp("t3c"), n_layers=2, seed=0)


def test_cuda_cfg_and_batching_match_references(small_dir):
    model = T3Model.from_safetensors(
        small_dir / "t3_cfg.safetensors", device="cuda", max_positions=512
    )
    tok = T3Tokenizer(small_dir / "tokenizer.json")
    reqs = [
        request("a", seed=1, max_new_tokens=8),
        request(
            "b",
            text="Another, longer sentence here.",
            conditionals=make_conds(4),
            seed=2,
            cfg_weight=1.0,
            max_new_tokens=8,
        ),
    ]
    decoder = T3BatchDecoder(model, tok, max_batch_size=2, max_seq_len=256, record_logits=True)
    together = run_decoder(decoder, reqs)
    for r in reqs:
        ids = tok.encode(r.text)
        tokens = [o.token for o in together[r.request_id]]
        for step, out in enumerate(together[r.request_id]):
            cond, uncond = reference_logits(model, r, ids, tokens[:step])
            expected = cond + r.cfg_weight * (cond - uncond)
            torch.testing.assert_close(out.logits, expected, atol=2e-3, rtol=1e-3)
        alone = run_decoder(T3BatchDecoder(model, tok, max_batch_size=1, max_seq_len=256), [r])
        assert [o.token for o in alone[r.request_id]] == tokens


def test_cuda_graphs_decode_like_eager(small_dir):
    model = T3Model.from_safetensors(
        small_dir / "t3_cfg.safetensors", device="cuda", max_positions=256
    )
    tok = T3Tokenizer(small_dir / "tokenizer.json")
    reqs = [
        request("a", seed=1, max_new_tokens=10),
        request(
            "b", text="Two.", conditionals=make_conds(4), cfg_weight=0.0, seed=2, max_new_tokens=6
        ),
        request("c", text="Third one, a little longer.", seed=3, max_new_tokens=12),
    ]
    eager = T3BatchDecoder(model, tok, max_batch_size=3, max_seq_len=256, record_logits=True)
    # Graphs every 16 cached keys: the requests' steps cross several cache-length buckets.
    graphed = T3BatchDecoder(
        model, tok, max_batch_size=3, max_seq_len=256, record_logits=True, kv_bucket=16
    )
    with torch.inference_mode():
        graphed.capture_graphs()
    assert graphed.graph_keys == [(r, n) for r in (1, 2, 4, 6) for n in range(16, 257, 16)]
    # Prefill graphs: rows up to the slots, prompt lengths in steps of 64 up to the slot length.
    assert graphed.prefill_graph_keys == [(r, n) for r in (1, 2, 4, 6) for n in (64, 128, 192, 256)]
    for together in (False, True):  # one request a prefill pass (1-2 rows), then all three (5)
        want = run_decoder(eager, reqs, prefill_together=together)
        got = run_decoder(graphed, reqs, prefill_together=together)
        for r in reqs:
            assert [o.token for o in got[r.request_id]] == [o.token for o in want[r.request_id]]
            for a, b in zip(got[r.request_id], want[r.request_id], strict=True):
                torch.testing.assert_close(a.logits, b.logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("graphs", [False, True])
async def test_full_size_bf16_streams_concurrent_requests(full_dir, graphs):
    backend = TorchT3Backend(
        full_dir, device="cuda", max_batch_size=8, max_seq_len=1536, cuda_graphs=graphs
    )
    await backend.start()
    try:
        model = backend.decoder.model
        assert model.config.n_layers == 30 and model.dtype == torch.bfloat16
        assert bool(backend.decoder.graph_keys) == graphs

        async def run(n: int, tokens: int) -> float:
            async def one(i: int) -> list[int]:
                req = request(
                    f"n{n}-{i}", seed=i, conditionals=make_conds(i), max_new_tokens=tokens
                )
                return [t async for d in backend.generate(req) for t in d]

            start = time.perf_counter()
            results = await asyncio.gather(*(one(i) for i in range(n)))
            elapsed = time.perf_counter() - start
            for got in results:
                assert 0 < len(got) <= tokens and all(0 <= t < 6561 for t in got)
            return elapsed

        await run(1, 20)  # warm-up
        for n in (1, 4, 8):
            elapsed = await run(n, 150)
            print(
                f"\nT3 torch bf16, 30 layers, graphs={graphs}, {n} concurrent x 150 tokens: "
                f"{elapsed:.2f} s, {elapsed / 150 * 1000:.1f} ms per step"
            )
    finally:
        await backend.close()


def test_cuda_graphs_record_alignment_like_eager_and_a_full_pass(small_dir):
    from .test_t3_alignment_capture import reference_attention, sequence

    model = T3Model.from_safetensors(
        small_dir / "t3_cfg.safetensors", device="cuda", max_positions=256
    )
    tok = T3Tokenizer(small_dir / "tokenizer.json")
    reqs = [
        request("a", seed=1, max_new_tokens=10, alignment=True),
        request("plain", text="Not timed.", seed=5, max_new_tokens=6),
        request(
            "b",
            text="Two words, unguided.",
            conditionals=make_conds(4),
            cfg_weight=0.0,
            seed=2,
            max_new_tokens=12,
            alignment=True,
        ),
    ]
    eager = T3BatchDecoder(model, tok, max_batch_size=3, max_seq_len=256)
    graphed = T3BatchDecoder(model, tok, max_batch_size=3, max_seq_len=256, kv_bucket=16)
    with torch.inference_mode():
        graphed.capture_graphs()
    assert graphed.aligned_graph_keys == graphed.graph_keys  # a recording twin of each graph
    heads = graphed._align.heads
    for together in (False, True):
        want = run_decoder(eager, reqs, prefill_together=together)
        got = run_decoder(graphed, reqs, prefill_together=together)
        assert all(o.alignment is None for o in got["plain"])
        for r in reqs:
            assert [o.token for o in got[r.request_id]] == [o.token for o in want[r.request_id]]
        for r in (reqs[0], reqs[2]):
            ids = tok.encode(r.text)
            tokens = [o.token for o in got[r.request_id]]
            with torch.inference_mode():
                seq, c = sequence(model, r, ids, tokens)
                ref = reference_attention(model, seq, heads)
            first = c + len(ids) + 1
            for step, (a, b) in enumerate(zip(got[r.request_id], want[r.request_id], strict=True)):
                np.testing.assert_allclose(a.alignment, b.alignment, atol=1e-5, rtol=1e-4)
                expected = ref[first + step, :, c : c + len(ids)].numpy()
                np.testing.assert_allclose(a.alignment, expected, atol=1e-4, rtol=1e-3)
    # Decode steps where nobody asks replay the plain graphs and record nothing.
    with torch.inference_mode():
        graphed.add(reqs[1])
        graphed._align.out.fill_(-1.0)
        steps = 0
        while graphed.active_ids:
            assert all(o.alignment is None for o in graphed.step())
            steps += 1
    assert steps <= 5 and bool((graphed._align.out == -1.0).all())
