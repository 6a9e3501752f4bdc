"""The alignment heads' attention recorded during T3 decoding (word timestamps), on CPU.

What the decoder hands out per token must be what a plain full causal pass over the same
sequence gives: the softmax of the chosen heads' scores from the query that predicted the
token, over the text keys, conditional row only.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from chatterbox_sidecar.engines.chatterbox.t3.alignment import (
    ALIGNMENT_HEADS,
    alignment_heads,
)
from chatterbox_sidecar.engines.chatterbox.t3.model import T3Model, _apply_rope
from chatterbox_sidecar.engines.chatterbox.t3.torch_backend import T3BatchDecoder, TorchT3Backend

from .test_t3_torch import make_conds, request, run_decoder

pytestmark = pytest.mark.torch


def test_heads_of_the_real_model_and_of_small_ones():
    assert alignment_heads(30, 16) == ALIGNMENT_HEADS
    assert alignment_heads(2, 4) == ((0, 3), (1, 3), (1, 2))
    assert alignment_heads(1, 16) == ((0, 15), (0, 11), (0, 2))
    assert alignment_heads(24, 16) == ((12, 15), (13, 11), (9, 2))
    with pytest.raises(ValueError):
        alignment_heads(0, 16)


def sequence(model: T3Model, req, ids: list[int], tokens: list[int]) -> tuple[torch.Tensor, int]:
    """The conditional row's whole sequence, laid out by hand, and its conditioning length."""
    conds = req.conditionals
    cond = model.conditioning(
        conds["speaker_emb"], conds["cond_prompt_speech_tokens"], req.exaggeration
    )
    ids_t = torch.tensor(ids, device=model.device)
    text = model.text_emb.weight[ids_t] + model.text_pos_emb.emb.weight[: len(ids)]
    bos = model.speech_emb.weight[6561] + model.speech_pos_emb.emb.weight[0]
    speech = [
        model.speech_emb.weight[t] + model.speech_pos_emb.emb.weight[i + 1]
        for i, t in enumerate(tokens)
    ]
    return torch.cat([cond, text, torch.stack([bos, bos, *speech])]), cond.shape[0]


def reference_attention(model: T3Model, seq: torch.Tensor, heads) -> torch.Tensor:
    """Every query's causal attention probabilities ``[L, len(heads), L]`` (on the CPU), from a
    plain full pass: each layer's input is caught on the way and its scores recomputed in
    float64."""
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.register_forward_hook(
            lambda module, args, out, i=i: inputs.__setitem__(i, args[0][0])
        )
        for i, layer in enumerate(model.tfmr.layers)
    ]
    try:
        model.forward_full(seq[None])
    finally:
        for hook in hooks:
            hook.remove()
    n, device = seq.shape[0], seq.device
    cos, sin = model.rope.lookup(torch.arange(n, device=device), torch.float64)
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    maps = []
    for layer, head in heads:
        attn = model.tfmr.layers[layer].self_attn
        x = inputs[layer].double()
        q = (x @ attn.q_proj.weight.double().T).view(n, -1, 64)[:, head]
        k = (x @ attn.k_proj.weight.double().T).view(n, -1, 64)[:, head]
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        scores = (q @ k.T / 8.0).masked_fill(~causal, float("-inf"))
        maps.append(scores.softmax(-1))
    return torch.stack(maps, dim=1).cpu()


@pytest.mark.parametrize("together", [False, True])
def test_recorded_rows_equal_a_full_pass(model, tokenizer, together):
    decoder = T3BatchDecoder(model, tokenizer, max_batch_size=3, max_seq_len=256)
    heads = alignment_heads(model.config.n_layers, model.config.n_heads)
    reqs = [
        request("a", alignment=True, max_new_tokens=7),
        request("plain", text="Not timed at all.", seed=2, max_new_tokens=5),
        request(
            "b",
            text="Another one, unguided.",
            conditionals=make_conds(3),
            cfg_weight=0.0,
            alignment=True,
            seed=4,
            max_new_tokens=9,
        ),
    ]
    outs = run_decoder(decoder, reqs, prefill_together=together)
    assert all(o.alignment is None for o in outs["plain"])
    for req in (reqs[0], reqs[2]):
        ids = tokenizer.encode(req.text)
        tokens = [o.token for o in outs[req.request_id]]
        assert len(tokens) == req.max_new_tokens
        with torch.inference_mode():
            seq, c = sequence(model, req, ids, tokens)
            ref = reference_attention(model, seq, heads)
        first_query = c + len(ids) + 1  # the second start-of-speech row ends the prompt
        for step, out in enumerate(outs[req.request_id]):
            assert out.alignment.shape == (len(heads), len(ids))
            assert out.alignment.dtype == np.float32
            want = ref[first_query + step, :, c : c + len(ids)].numpy()
            np.testing.assert_allclose(out.alignment, want, atol=2e-5, rtol=1e-4)
            assert 0 < out.alignment.sum(axis=1).max() <= 1 + 1e-5


def test_alignment_changes_no_token(model, tokenizer):
    reqs = [request("a", max_new_tokens=10), request("b", text="Short.", seed=3)]
    plain = run_decoder(T3BatchDecoder(model, tokenizer, max_batch_size=2), reqs)
    asked = [request("a", max_new_tokens=10, alignment=True), request("b", text="Short.", seed=3)]
    aligned = run_decoder(T3BatchDecoder(model, tokenizer, max_batch_size=2), asked)
    for r in reqs:
        assert [o.token for o in aligned[r.request_id]] == [o.token for o in plain[r.request_id]]


def test_a_decoder_without_alignment_ignores_the_ask(model, tokenizer):
    decoder = T3BatchDecoder(model, tokenizer, max_batch_size=1, alignment=False)
    assert not decoder.aligns
    outs = run_decoder(decoder, [request("a", alignment=True, max_new_tokens=4)])
    assert all(o.alignment is None for o in outs["a"])


def test_text_past_the_alignment_width_decodes_without_rows(model, tokenizer):
    decoder = T3BatchDecoder(model, tokenizer, max_batch_size=1, alignment_width=8)
    outs = run_decoder(decoder, [request("a", alignment=True, max_new_tokens=3)])
    assert len(outs["a"]) == 3 and all(o.alignment is None for o in outs["a"])


async def test_backend_streams_one_row_per_token(t3_dir, tokenizer):
    backend = TorchT3Backend(t3_dir, max_batch_size=2, max_seq_len=256)
    await backend.start()
    try:
        assert backend.word_alignment
        req = request("s", alignment=True, max_new_tokens=12)
        plain = request("p", max_new_tokens=12)
        stream = backend.generate(req)
        other = backend.generate(plain)
        assert other.text_tokens is None
        n_text = len(tokenizer.encode(req.text))
        assert len(stream.text_tokens) == n_text and stream.text_tokens[0] == "[START]"
        tokens, rows = [], []
        async for delta in stream:
            tokens += delta
            rows += stream.take_alignment()
            assert len(rows) == len(tokens)
        assert 0 < len(tokens) <= 12
        assert all(r.shape == (3, n_text) for r in rows)
        await asyncio.wait_for(asyncio.gather(*[_drain(other)]), 30)
        assert other.take_alignment() == []
    finally:
        await backend.close()


async def _drain(stream) -> list[int]:
    return [t async for delta in stream for t in delta]
