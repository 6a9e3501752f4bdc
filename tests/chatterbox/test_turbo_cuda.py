"""Turbo's T3 on a CUDA GPU (skipped without one): decode CUDA graphs sample what eager does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from chatterbox_sidecar.engines.chatterbox.turbo.t3_backend import TurboT3BatchDecoder
from chatterbox_sidecar.engines.chatterbox.turbo.t3_model import TurboT3Model
from chatterbox_sidecar.engines.chatterbox.turbo.text import TurboTokenizer

from .test_turbo_t3 import request
from .turbo_checkpoint import write_random_turbo_t3

pytestmark = [
    pytest.mark.torch,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def turbo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_turbo_t3(tmp_path_factory.mktemp("turbo-cuda"), n_layers=2)


def run(decoder: TurboT3BatchDecoder, requests) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    with torch.inference_mode():
        for o in decoder.add_batch(requests):
            out.setdefault(o.request_id, []).append(o.token)
        while decoder.active_ids:
            for o in decoder.step():
                out.setdefault(o.request_id, []).append(o.token)
    return out


def test_turbo_cuda_graphs_decode_like_eager(turbo_dir):
    model = TurboT3Model.from_safetensors(turbo_dir / "t3_turbo_v1.safetensors", device="cuda")
    tok = TurboTokenizer(turbo_dir)
    requests = [
        request("r0", "Hello there.", seed=1, max_new_tokens=20),
        request("r1", "A longer sentence [sigh] to speak.", seed=2, max_new_tokens=13),
        request("r2", "Short.", seed=3, max_new_tokens=30, temperature=0.0),
    ]
    eager = TurboT3BatchDecoder(model, tok, max_batch_size=4, max_seq_len=256, kv_bucket=16)
    graphed = TurboT3BatchDecoder(model, tok, max_batch_size=4, max_seq_len=256, kv_bucket=16)
    with torch.inference_mode():
        graphed.capture_graphs()
    assert graphed.graph_keys == [(r, n) for r in (1, 2, 4) for n in range(16, 257, 16)]
    want = run(eager, requests)
    got = run(graphed, requests)
    assert got == want
    assert [len(got[r.request_id]) for r in requests] == [20, 13, 30]
