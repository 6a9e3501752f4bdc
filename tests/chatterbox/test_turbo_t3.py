"""Turbo's T3 on the CPU: GPT-2 backbone, tokenizer, sampling order, stop handling, batching.

Checkpoints are written by the tests in the real layout (``turbo_checkpoint``), random or
scripted to speak a fixed token chain.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from chatterbox_sidecar.engines.chatterbox.t3.backend import T3Request
from chatterbox_sidecar.engines.chatterbox.t3.model import T3KVCache
from chatterbox_sidecar.engines.chatterbox.turbo.t3_backend import (
    TurboT3Backend,
    TurboT3BatchDecoder,
    turbo_sample,
)
from chatterbox_sidecar.engines.chatterbox.turbo.t3_model import TurboT3Model
from chatterbox_sidecar.engines.chatterbox.turbo.text import TurboTokenizer, turbo_punc_norm
from safetensors.torch import load_file

from .turbo_checkpoint import (
    ADDED_TAGS,
    write_random_turbo_t3,
    write_scripted_turbo_t3,
)

pytestmark = pytest.mark.torch

SCRIPT = [5, 900, 17, 4000, 6000, 33, 2048]
VOICE = {
    "speaker_emb": torch.rand(1, 256, generator=torch.Generator().manual_seed(1)),
    "cond_prompt_speech_tokens": torch.randint(0, 6561, (1, 60)),
}


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory) -> Path:
    return write_random_turbo_t3(tmp_path_factory.mktemp("turbo-random"), n_layers=2)


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory) -> Path:
    return write_scripted_turbo_t3(tmp_path_factory.mktemp("turbo-scripted"), [*SCRIPT, 6562])


def request(rid: str, text: str = "Hello there.", **kw) -> T3Request:
    return T3Request(request_id=rid, text=text, conditionals=VOICE, **kw)


def naive_gpt2(state: dict[str, torch.Tensor], embeds: torch.Tensor) -> torch.Tensor:
    """GPT-2 as its definition reads, straight from the checkpoint tensors ([L, D] -> [L, D])."""
    n, d = embeds.shape
    heads = d // 64
    x = embeds + state["tfmr.wpe.weight"][:n]
    causal = torch.full((n, n), float("-inf")).triu(1)
    layers = len({k.split(".")[2] for k in state if k.startswith("tfmr.h.")})
    for i in range(layers):
        p = f"tfmr.h.{i}."
        h = F.layer_norm(x, (d,), state[p + "ln_1.weight"], state[p + "ln_1.bias"], 1e-5)
        qkv = h @ state[p + "attn.c_attn.weight"] + state[p + "attn.c_attn.bias"]
        q, k, v = (t.view(n, heads, 64).transpose(0, 1) for t in qkv.split(d, dim=-1))
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(64) + causal, dim=-1) @ v
        att = att.transpose(0, 1).reshape(n, d)
        x = x + att @ state[p + "attn.c_proj.weight"] + state[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (d,), state[p + "ln_2.weight"], state[p + "ln_2.bias"], 1e-5)
        u = h @ state[p + "mlp.c_fc.weight"] + state[p + "mlp.c_fc.bias"]
        u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
        x = x + u @ state[p + "mlp.c_proj.weight"] + state[p + "mlp.c_proj.bias"]
    return F.layer_norm(x, (d,), state["tfmr.ln_f.weight"], state["tfmr.ln_f.bias"], 1e-5)


def test_backbone_matches_gpt2_and_the_cache_matches_the_full_pass(random_dir):
    state = load_file(str(random_dir / "t3_turbo_v1.safetensors"))
    model = TurboT3Model.from_safetensors(random_dir / "t3_turbo_v1.safetensors")
    cond = model.conditioning(VOICE["speaker_emb"], VOICE["cond_prompt_speech_tokens"])
    assert cond.shape == (1 + 60, 128)  # speaker row + prompt tokens, no perceiver or emotion
    prompt = model.prompt_embeds(cond, torch.tensor([39, 72, 50265, 13]))
    assert torch.allclose(prompt[-1], state["speech_emb.weight"][6561])
    with torch.inference_mode():
        full = model.forward_full(prompt[None])[0]
        assert torch.allclose(full, naive_gpt2(state, prompt), atol=1e-5)
        # prefill the prompt minus its last 3 rows, then decode them one by one
        cache = T3KVCache(model.config, 2, 128, "cpu", torch.float32)
        n = prompt.shape[0]
        head = model.prefill(prompt[None, : n - 3], cache, torch.tensor([1]))
        assert torch.allclose(head[0], full[n - 4], atol=1e-5)
        for pos in range(n - 3, n):
            embeds = torch.stack([torch.zeros_like(prompt[pos]), prompt[pos]])
            out = model.decode(embeds, torch.tensor([0, pos]), cache, pos + 1)
            assert torch.allclose(out[1], full[pos], atol=1e-5)
    logits = model.logits(full[-1:])
    assert logits.shape == (1, 6563)
    assert torch.allclose(logits[0], full[-1] @ state["speech_head.weight"].T
                          + state["speech_head.bias"], atol=1e-5)  # fmt: skip


def test_an_original_t3_file_is_refused(tmp_path):
    from .t3_checkpoint import write_random_t3_checkpoint

    write_random_t3_checkpoint(tmp_path, n_layers=1, hidden=64, intermediate=128)
    with pytest.raises(ValueError, match="not a Chatterbox-Turbo T3 checkpoint"):
        TurboT3Model.from_safetensors(tmp_path / "t3_cfg.safetensors")


def test_tokenizer_keeps_tags_whole_and_turbo_punctuation(random_dir):
    tok = TurboTokenizer(random_dir)
    assert len(tok) == 50276
    ids = tok.encode("well [laugh] okay [clear throat]")
    assert 50257 + ADDED_TAGS.index("[laugh]") in ids
    assert 50257 + ADDED_TAGS.index("[clear throat]") in ids
    assert tok.decode(ids) == "Well [laugh] okay [clear throat]."
    # Turbo keeps what the Original's clean-up rewrites
    assert turbo_punc_norm("wait... no; go - now") == "Wait... no; go - now."
    assert turbo_punc_norm("a: b…") == "A, b,"
    assert turbo_punc_norm("  ") == "You need to add some text for me to talk."


def test_sampling_applies_the_penalty_after_top_k_and_top_p():
    logits = torch.full((1, 10), -5.0)
    logits[0, 3], logits[0, 7] = 2.0, 1.9
    seen = torch.zeros(1, 10, dtype=torch.bool)
    seen[0, 3] = True
    params = torch.tensor([[100.0], [1.0], [0.5]])  # penalty, temperature, top-p
    for step in range(20):
        token = turbo_sample(logits, seen, params, 1000, torch.tensor([step]), torch.tensor([0]))
        # top-p keeps token 3 alone before the penalty could make 7 the likelier one
        assert token.item() == 3
    # top-k 1 is greedy whatever the noise
    params = torch.tensor([[1.0], [1.0], [1.0]])
    picks = {
        turbo_sample(logits, seen, params, 1, torch.tensor([s]), torch.tensor([0])).item()
        for s in range(20)
    }
    assert picks == {3}


async def _collect(backend: TurboT3Backend, req: T3Request) -> list[int]:
    return [t async for delta in backend.generate(req) for t in delta]


async def test_scripted_turbo_speaks_its_script_and_stops(scripted_dir):
    backend = TurboT3Backend(scripted_dir, device="cpu", max_batch_size=4, max_seq_len=1024)
    await backend.start()
    try:
        tokens = await asyncio.gather(
            _collect(backend, request("a", seed=1)),
            _collect(backend, request("b", text="Another [laugh] one.", temperature=0.0)),
        )
        assert tokens == [SCRIPT, SCRIPT]  # the stop token 6562 ends it and is not passed on
        assert not backend.word_alignment  # no alignment heads for Turbo: asking does nothing
        cut = await _collect(backend, request("c", max_new_tokens=4, alignment=True))
        assert cut == SCRIPT[:4]
    finally:
        await backend.close()


def test_batched_decoding_equals_one_by_one(random_dir):
    model = TurboT3Model.from_safetensors(random_dir / "t3_turbo_v1.safetensors")
    tok = TurboTokenizer(random_dir)
    requests = [
        request("r0", "Hello there.", seed=1, max_new_tokens=12),
        request("r1", "A much longer sentence [sigh] to speak.", seed=2, max_new_tokens=9),
        request("r2", "Short.", seed=3, max_new_tokens=15, temperature=0.0),
    ]

    def run(batches: list[list[T3Request]]) -> dict[str, list[int]]:
        decoder = TurboT3BatchDecoder(model, tok, max_batch_size=4, max_seq_len=512)
        out: dict[str, list[int]] = {}
        with torch.inference_mode():
            for batch in batches:
                for o in decoder.add_batch(batch):
                    out.setdefault(o.request_id, []).append(o.token)
                for _ in range(3):  # the next batch joins requests already decoding
                    for o in decoder.step():
                        out.setdefault(o.request_id, []).append(o.token)
            while decoder.active_ids:
                for o in decoder.step():
                    out.setdefault(o.request_id, []).append(o.token)
        return out

    together = run([requests])
    alone = {}
    for r in requests:
        alone |= run([[r]])
    staggered = run([[requests[1]], [requests[0], requests[2]]])
    assert together == alone == staggered
    assert [len(together[r.request_id]) for r in requests] == [12, 9, 15]  # random: no stop
