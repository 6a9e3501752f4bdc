"""Our T3 network against its checkpoint: loading, the KV cache, and straightforward references."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from chatterbox_sidecar.engines.chatterbox.t3.model import (
    T3KVCache,
    T3Model,
    llama3_inv_freq,
)
from chatterbox_sidecar.engines.chatterbox.t3.text import T3Tokenizer, punc_norm
from chatterbox_sidecar.engines.chatterbox.t3.torch_backend import TorchT3Backend
from safetensors.torch import load_file, save_file

from .t3_checkpoint import write_random_t3_checkpoint

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def real_width_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_t3_checkpoint(tmp_path_factory.mktemp("t3full"), n_layers=2, seed=0)


@pytest.fixture(scope="module")
def model(real_width_dir: Path) -> T3Model:
    return T3Model.from_safetensors(real_width_dir / "t3_cfg.safetensors", max_positions=256)


def test_loader_reads_shape_from_checkpoint(model, real_width_dir):
    cfg = model.config
    assert (cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.head_dim) == (2, 1024, 16, 64)
    assert (cfg.intermediate_size, cfg.text_vocab_size, cfg.speech_vocab_size) == (4096, 704, 8194)
    assert cfg.conditioning_len == 34
    state = load_file(str(real_width_dir / "t3_cfg.safetensors"))
    # Every checkpoint tensor but the two unused ones landed in the parameter of the same name.
    ours = model.state_dict()
    assert set(state) - set(ours) == {"tfmr.embed_tokens.weight", "text_head.weight"}
    for key, value in ours.items():
        assert torch.equal(value, state[key]), key


async def test_backend_loads_through_the_same_loader(real_width_dir):
    backend = TorchT3Backend(real_width_dir, device="cpu", max_batch_size=1, max_seq_len=128)
    await backend.start()
    try:
        assert backend.decoder.model.config.n_layers == 2
        assert backend.decoder.model.dtype == torch.float32
    finally:
        await backend.close()


def test_loader_rejects_a_foreign_checkpoint(tmp_path, real_width_dir):
    state = load_file(str(real_width_dir / "t3_cfg.safetensors"))
    del state["tfmr.layers.1.mlp.up_proj.weight"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "t3_cfg.safetensors"))
    with pytest.raises(ValueError, match="up_proj"):
        T3Model.from_safetensors(tmp_path / "t3_cfg.safetensors")
    save_file({"speech_emb.weight": torch.zeros(4, 4)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a Chatterbox T3 checkpoint"):
        T3Model.from_safetensors(tmp_path / "other.safetensors")


def test_llama3_rope_frequencies(model):
    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    ours = llama3_inv_freq(model.config).double()
    wavelen = 2 * math.pi / base
    high = wavelen < 8192 / 4  # short wavelengths: unchanged
    low = wavelen > 8192 / 1  # long wavelengths: divided by the factor 8
    torch.testing.assert_close(ours[high], base[high], rtol=1e-6, atol=0)
    torch.testing.assert_close(ours[low], base[low] / 8, rtol=1e-6, atol=0)
    mid = ~(high | low)
    assert mid.any()
    assert torch.all(ours[mid] <= base[mid]) and torch.all(ours[mid] >= base[mid] / 8)


def reference_llama(model: T3Model, x: torch.Tensor) -> torch.Tensor:
    """The Llama backbone written out directly from the checkpoint tensors ([L, D] -> [L, D])."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    n, d = x.shape
    inv = llama3_inv_freq(cfg).double()
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rms(h, w):
        return w * h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-5)

    def rope(t):  # t: [heads, L, 64]
        rot = torch.cat([-t[..., 32:], t[..., :32]], -1)
        return t * cos + rot * sin

    h = x.double()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(cfg.n_layers):
        p = f"tfmr.layers.{i}."
        a = rms(h, sd[p + "input_layernorm.weight"])
        q, k, v = (
            (a @ sd[p + f"self_attn.{m}.weight"].T).view(n, cfg.n_heads, 64).transpose(0, 1)
            for m in ("q_proj", "k_proj", "v_proj")
        )
        scores = rope(q) @ rope(k).transpose(1, 2) / 8.0
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        h = h + att.transpose(0, 1).reshape(n, d) @ sd[p + "self_attn.o_proj.weight"].T
        m = rms(h, sd[p + "post_attention_layernorm.weight"])
        gate = m @ sd[p + "mlp.gate_proj.weight"].T
        up = m @ sd[p + "mlp.up_proj.weight"].T
        h = h + (gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return rms(h, sd["tfmr.norm.weight"])


def test_backbone_matches_a_direct_llama(model):
    x = torch.randn(40, 1024, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model.forward_full(x[None])[0]
    torch.testing.assert_close(ours.double(), reference_llama(model, x), atol=2e-4, rtol=1e-4)


def test_conditioning_matches_a_direct_computation(model):
    gen = torch.Generator().manual_seed(1)
    speaker = torch.randn(1, 256, generator=gen)
    prompt = torch.randint(0, 6561, (1, 150), generator=gen)
    with torch.inference_mode():
        rows = model.conditioning(speaker, prompt, 0.7)
    sd = model.state_dict()
    assert rows.shape == (34, 1024)
    spk = speaker[0] @ sd["cond_enc.spkr_enc.weight"].T + sd["cond_enc.spkr_enc.bias"]
    torch.testing.assert_close(rows[0], spk, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[-1], 0.7 * sd["cond_enc.emotion_adv_fc.weight"][:, 0])
    # Perceiver: learned queries cross-attend to the embedded prompt, then self-attend.
    emb = sd["speech_emb.weight"][prompt[0]] + sd["speech_pos_emb.emb.weight"][:150]
    p = "cond_enc.perceiver.attn."

    def block(x1, x2):
        ln = torch.nn.functional.layer_norm
        n1 = ln(x1, (1024,), sd[p + "norm.weight"], sd[p + "norm.bias"])
        n2 = ln(x2, (1024,), sd[p + "norm.weight"], sd[p + "norm.bias"])
        q, k, v = (
            (t @ sd[p + f"{m}.weight"].T + sd[p + f"{m}.bias"]).view(-1, 4, 256).transpose(0, 1)
            for t, m in ((n1, "to_q"), (n2, "to_k"), (n2, "to_v"))
        )
        att = (q @ k.transpose(1, 2) / 16.0).softmax(-1) @ v
        out = att.transpose(0, 1).reshape(-1, 1024)
        return x1 + out @ sd[p + "proj_out.weight"].T + sd[p + "proj_out.bias"]

    mixed = block(sd["cond_enc.perceiver.pre_attention_query"][0], emb)
    torch.testing.assert_close(rows[1:33], block(mixed, mixed), atol=1e-4, rtol=1e-4)


def test_cached_prefill_and_decode_match_full_passes(model):
    gen = torch.Generator().manual_seed(2)
    seq_a = torch.randn(30, 1024, generator=gen)
    seq_b = torch.randn(18, 1024, generator=gen)
    cache = T3KVCache(model.config, n_slots=4, max_len=64, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        full_a = model.forward_full(seq_a[None])[0]
        full_b = model.forward_full(seq_b[None])[0]
        # Prompts of 25 and 13 tokens in slots 1 and 3; slots 0 and 2 stay idle.
        model.prefill(seq_a[None, :25], cache, torch.tensor([1]))
        model.prefill(seq_b[None, :13], cache, torch.tensor([3]))
        for step in range(5):
            embeds = torch.zeros(4, 1024)
            embeds[1], embeds[3] = seq_a[25 + step], seq_b[13 + step]
            positions = torch.tensor([0, 25 + step, 0, 13 + step])
            hidden = model.decode(embeds, positions, cache, kv_len=26 + step)
            torch.testing.assert_close(hidden[1], full_a[25 + step], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(hidden[3], full_b[13 + step], atol=1e-4, rtol=1e-4)


def test_tokenizer_and_text_clean_up(real_width_dir):
    tok = T3Tokenizer(real_width_dir / "tokenizer.json")
    ids = tok.encode("hello   world")
    assert ids[0] == 255 and ids[-1] == 0
    assert tok.encode("Hello world.") == ids  # cleaned to the same text
    assert punc_norm("  ") == "You need to add some text for me to talk."
    # Same clean-up as upstream (chatterbox-vllm's copy of it needs no vLLM to import).
    from chatterbox_vllm.text_utils import punc_norm as upstream

    for text in [
        "wait... what; really",
        "a: b - c",
        "“Quoted” — dash – here",
        "  lead",
        "ok!",
        "no end",
        "x…y",
        "it’s fine ,ok",
    ]:
        assert punc_norm(text) == upstream(text), text
