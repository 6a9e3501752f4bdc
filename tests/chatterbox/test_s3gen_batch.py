"""Batched S3Gen decoding (rows = streams) and the inference speed-ups.

On CPU: chunks of several streams with different voices, prompt lengths and window lengths
decoded in one batch equal the same chunks decoded one stream at a time (padding is masked,
rows never interact); folded weight norm changes nothing; the bf16 estimator stays close to
fp32. On CUDA (skipped here): graph replay at bucketed shapes equals eager decoding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chatterbox_sidecar.engines.chatterbox.conditionals import VoiceConditionals, cap_reference
from chatterbox_sidecar.engines.chatterbox.s3gen.graphs import bf16_estimator, fold_weight_norm
from chatterbox_sidecar.engines.chatterbox.s3gen.stream import (
    Reference,
    S3GenStreamDecoder,
    StreamConfig,
)

pytestmark = pytest.mark.torch

CONFIG = StreamConfig(chunk_size=8, first_chunk_size=7, context_window=10, flow_steps=2)


def references(model_dir, device="cpu") -> list[Reference]:
    gen = VoiceConditionals.load(model_dir / "conds.pt").gen
    other = dict(gen)
    g = torch.Generator().manual_seed(7)
    other["prompt_feat"] = gen["prompt_feat"] + 0.5 * torch.randn(
        gen["prompt_feat"].shape, generator=g
    )
    other["embedding"] = torch.randn(gen["embedding"].shape, generator=g)
    dev = torch.device(device)
    return [
        Reference.from_gen(gen, dev, torch.float32),
        Reference.from_gen(cap_reference(other, 1.0), dev, torch.float32),
        Reference.from_gen(cap_reference(gen, 1.4), dev, torch.float32),
    ]


def token_lists() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 6561, (n,), generator=g).tolist() for n in (30, 22, 26)]


def decode_separately(decoder, refs, toks) -> list[list[np.ndarray]]:
    out = []
    for ref, tk in zip(refs, toks, strict=True):
        stream = decoder.new_stream(ref)
        chunks = []
        for i in range(0, len(tk), 5):
            stream.push(tk[i : i + 5])
            if i + 5 >= len(tk):
                chunks.append(decoder.decode_chunk(stream, True))
            elif stream.ready(CONFIG):
                chunks.append(decoder.decode_chunk(stream, False))
        out.append(chunks)
    return out


def decode_together(decoder, refs, toks) -> list[list[np.ndarray]]:
    """The same arrival pattern, but every round's ready chunks go in one batch."""
    streams = [decoder.new_stream(r) for r in refs]
    out: list[list[np.ndarray]] = [[] for _ in refs]
    for i in range(0, max(len(t) for t in toks) + 5, 5):
        batch, final = [], []
        for k, (stream, tk) in enumerate(zip(streams, toks, strict=True)):
            if stream.finished:
                continue
            stream.push(tk[i : i + 5])
            if i + 5 >= len(tk):
                batch.append(k)
                final.append(True)
            elif stream.ready(CONFIG):
                batch.append(k)
                final.append(False)
        if batch:
            audios = decoder.decode_chunks([streams[k] for k in batch], final)
            for k, a in zip(batch, audios, strict=True):
                out[k].append(a)
    return out


@pytest.fixture(scope="module")
def decoder(s3gen_model) -> S3GenStreamDecoder:
    return S3GenStreamDecoder(s3gen_model, CONFIG)


def test_batched_chunks_equal_separate_decoding(decoder, s3gen_model_dir):
    refs, toks = references(s3gen_model_dir), token_lists()
    separate = decode_separately(decoder, refs, toks)
    together = decode_together(decoder, refs, toks)
    for a, b in zip(separate, together, strict=True):
        assert [len(c) for c in a] == [len(c) for c in b]
        x, y = np.concatenate(a), np.concatenate(b)
        assert len(x) == len(y) > 0
        np.testing.assert_allclose(y, x, atol=2e-4 * np.abs(x).max())


def test_batch_rejects_bad_input_without_changing_streams(decoder, s3gen_model_dir):
    ref = references(s3gen_model_dir)[0]
    ready, short = decoder.new_stream(ref), decoder.new_stream(ref)
    ready.push(range(20))
    short.push(range(3))
    with pytest.raises(RuntimeError):
        decoder.decode_chunks([ready, short], [False, False])
    assert ready.played_tokens == ready.chunks_decoded == 0
    with pytest.raises(ValueError):
        decoder.decode_chunks([ready, ready], [False, False])


def test_folded_weight_norm_is_the_same_function():
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        weight_norm(torch.nn.Conv1d(4, 6, 3)), weight_norm(torch.nn.Conv1d(6, 2, 1))
    )
    x = torch.randn(2, 4, 20)
    before = net(x)
    assert fold_weight_norm(net) == 2
    assert fold_weight_norm(net) == 0
    torch.testing.assert_close(net(x), before)
    assert not any("parametrizations" in n for n, _ in net.named_parameters())


def test_bf16_estimator_stays_close_to_fp32(s3gen_model):
    est = s3gen_model.flow.decoder.estimator
    fast = bf16_estimator(est)
    assert next(est.parameters()).dtype == torch.float32  # the original is untouched
    g = torch.Generator().manual_seed(1)
    b, n = 2, 40
    x, mu, cond = (torch.randn(b, 80, n, generator=g) for _ in range(3))
    mask = torch.ones(b, 1, n)
    spks = torch.randn(b, 80, generator=g)
    t = torch.tensor([0.3, 0.7])
    with torch.inference_mode():
        ref = est(x, mask, mu, t, spks, cond)
        bf = fast(*(a.bfloat16() for a in (x, mask, mu)), t, spks.bfloat16(), cond.bfloat16())
    rel = ((bf.float() - ref).norm() / ref.norm()).item()
    assert rel < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_eager(s3gen_model_dir):
    from chatterbox_sidecar.engines.chatterbox.s3gen.loader import load_s3gen

    model = load_s3gen(s3gen_model_dir / "s3gen.safetensors", "cuda")
    refs, toks = references(s3gen_model_dir, "cuda"), token_lists()
    eager = S3GenStreamDecoder(model, CONFIG, cuda_graphs=False)
    graphed = S3GenStreamDecoder(model, CONFIG, cuda_graphs=True)
    a = decode_together(eager, refs, toks)
    b = decode_together(graphed, refs, toks)
    assert graphed.graphs.captures > 0
    for x, y in zip(a, b, strict=True):
        x, y = np.concatenate(x), np.concatenate(y)
        assert len(x) == len(y)
        # Padded shapes pick other cuDNN/cuBLAS kernels (TF32 convolutions by default): the
        # same function up to rounding, which ~70 layers amplify to ~1e-3 here and there.
        # A final chunk is vocoded at a bucketed length (its last frame repeated), so the
        # utterance's closing 0.2 s is compared separately, more loosely.
        tail = 4800
        rel = np.sqrt(np.mean((y[:-tail] - x[:-tail]) ** 2) / np.mean(x[:-tail] ** 2))
        assert rel < 1e-2
        rel_tail = np.sqrt(np.mean((y[-tail:] - x[-tail:]) ** 2) / np.mean(x[-tail:] ** 2))
        assert rel_tail < 0.2


def test_sync_free_istft_matches_torch_istft(s3gen_model):
    from chatterbox_sidecar.engines.chatterbox.s3gen.graphs import istft_without_sync

    hift = s3gen_model.mel2wav
    n_fft, hop = hift.istft_params["n_fft"], hift.istft_params["hop_len"]
    window = hift.stft_window.float()
    g = torch.Generator().manual_seed(2)
    mag = 2 * torch.rand(3, n_fft // 2 + 1, 60, generator=g)
    phase = 3 * torch.randn(3, n_fft // 2 + 1, 60, generator=g)
    spec = torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))
    expected = torch.istft(spec, n_fft, hop, n_fft, window=window)
    torch.testing.assert_close(istft_without_sync(mag, phase, n_fft, hop, window), expected)


def test_sync_free_chunk_mask_matches_upstream():
    from chatterbox_sidecar.engines.chatterbox.s3gen.graphs import patch_sync_free_masks
    from chatterbox_vllm.models.s3gen import decoder
    from chatterbox_vllm.models.s3gen.utils.mask import add_optional_chunk_mask as upstream

    patch_sync_free_masks()
    masks = torch.tensor([[[True, True, False]], [[True, False, False]]])
    xs = torch.zeros(2, 3, 4)
    ours = decoder.add_optional_chunk_mask(xs, masks, False, False, 0, 0, -1)
    torch.testing.assert_close(ours, upstream(xs, masks.clone(), False, False, 0, 0, -1))
    empty = torch.tensor([[[True, False]], [[False, False]]])  # upstream logs, then fails
    assert decoder.add_optional_chunk_mask(xs, empty, False, False, 0, 0, -1).tolist() == [
        [[True, False]],
        [[True, True]],
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_precapture_covers_streaming_shapes(s3gen_model_dir):
    """After precapture, streams decoded chunk by chunk (hops of the set) record no graph."""
    from chatterbox_sidecar.engines.chatterbox.s3gen.loader import load_s3gen

    model = load_s3gen(s3gen_model_dir / "s3gen.safetensors", "cuda")
    refs, toks = references(s3gen_model_dir, "cuda"), token_lists()
    graphed = S3GenStreamDecoder(model, CONFIG, cuda_graphs=True)
    prompts = [r.prompt_token.shape[1] for r in refs]
    assert graphed.precapture(4, max(prompts), min_prompt_tokens=min(prompts)) > 0
    recorded = graphed.graphs.captures
    decode_together(graphed, refs, toks)
    assert graphed.graphs.captures == recorded
    assert graphed.graphs.eager_calls == 0
