"""Write T3 model files for tests: the real key names and shapes, random (or scripted) values.

``write_random_t3_checkpoint`` writes ``t3_cfg.safetensors`` (real Chatterbox T3 keys and
shapes; only the layer count differs) and the real English ``tokenizer.json`` (copied from the
installed chatterbox-vllm package). ``write_scripted_t3_checkpoint`` writes the same layout with
weights arranged so that the model deterministically speaks a given token sequence: useful for
stop-token, budget and audio-length tests.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 1024
HEADS = 16
HEAD_DIM = 64
MLP = 4096
TEXT_VOCAB = 704
SPEECH_VOCAB = 8194
TEXT_POSITIONS = 2050
SPEECH_POSITIONS = 4100
SPEAKER = 256
QUERIES = 32
START_SPEECH = 6561


def real_tokenizer_path() -> Path:
    """The English tokenizer.json shipped in chatterbox-vllm (found without importing vLLM)."""
    spec = importlib.util.find_spec("chatterbox_vllm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("chatterbox-vllm is not installed: it ships the T3 tokenizer.json")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "t3" / "tokenizer.json"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing")
    return path


def random_t3_state(
    n_layers: int = 2,
    seed: int = 0,
    hidden: int = HIDDEN,
    intermediate: int = MLP,
    text_vocab: int = TEXT_VOCAB,
) -> dict[str, torch.Tensor]:
    """A T3 state dict with the real keys and shapes (``n_layers`` layers), random values.

    ``hidden`` (a multiple of 64) and ``intermediate`` narrow the model for faster CPU tests;
    the defaults are the real sizes. Vocabularies and position tables are always real
    (``text_vocab``: 704 for the English T3, 2454 for the multilingual one).
    """
    gen = torch.Generator().manual_seed(seed)
    heads = hidden // HEAD_DIM

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    state: dict[str, torch.Tensor] = {
        "cond_enc.spkr_enc.weight": rnd(hidden, SPEAKER),
        "cond_enc.spkr_enc.bias": rnd(hidden),
        "cond_enc.emotion_adv_fc.weight": rnd(hidden, 1),
        "cond_enc.perceiver.pre_attention_query": rnd(1, QUERIES, hidden, std=0.2),
        "cond_enc.perceiver.attn.norm.weight": torch.ones(hidden),
        "cond_enc.perceiver.attn.norm.bias": torch.zeros(hidden),
        "text_emb.weight": rnd(text_vocab, hidden),
        "speech_emb.weight": rnd(SPEECH_VOCAB, hidden),
        "text_pos_emb.emb.weight": rnd(TEXT_POSITIONS, hidden),
        "speech_pos_emb.emb.weight": rnd(SPEECH_POSITIONS, hidden),
        "text_head.weight": rnd(text_vocab, hidden),
        "speech_head.weight": rnd(SPEECH_VOCAB, hidden),
        "tfmr.embed_tokens.weight": rnd(8, hidden),
        "tfmr.norm.weight": torch.ones(hidden),
    }
    for name in ("to_q", "to_k", "to_v", "proj_out"):
        state[f"cond_enc.perceiver.attn.{name}.weight"] = rnd(hidden, hidden)
        state[f"cond_enc.perceiver.attn.{name}.bias"] = rnd(hidden)
    for i in range(n_layers):
        p = f"tfmr.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{name}.weight"] = rnd(heads * HEAD_DIM, hidden)
        state[p + "mlp.gate_proj.weight"] = rnd(intermediate, hidden)
        state[p + "mlp.up_proj.weight"] = rnd(intermediate, hidden)
        state[p + "mlp.down_proj.weight"] = rnd(hidden, intermediate)
        state[p + "input_layernorm.weight"] = torch.ones(hidden)
        state[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    return state


def _write(model_dir: Path, state: dict[str, torch.Tensor]) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(model_dir / "t3_cfg.safetensors"))
    shutil.copyfile(real_tokenizer_path(), model_dir / "tokenizer.json")
    return model_dir


def write_random_t3_checkpoint(
    model_dir: str | Path,
    n_layers: int = 2,
    seed: int = 0,
    hidden: int = HIDDEN,
    intermediate: int = MLP,
) -> Path:
    """Write ``t3_cfg.safetensors`` (random) and ``tokenizer.json`` into ``model_dir``.

    At the real width (the default) a 2-layer file is ~250 MB and loads in about a second.

    Returns:
        ``model_dir`` as a Path.
    """
    return _write(Path(model_dir), random_t3_state(n_layers, seed, hidden, intermediate))


def write_scripted_t3_checkpoint(
    model_dir: str | Path,
    script: Sequence[int],
    n_layers: int = 1,
    seed: int = 0,
    hidden: int = 256,
    intermediate: int = 512,
) -> Path:
    """Write a T3 that speaks ``script`` after start-of-speech, whatever the text and voice.

    The layers' output projections are zeroed, so the final hidden state is the input token's
    embedding (speech positions are zeroed too); each scripted token's embedding points along its
    own axis and the speech head maps that axis to the next scripted token with a large logit.
    The model is thus a fixed chain ``6561 -> script[0] -> script[1] -> ...``; after the last
    token it continues with random weights. Tokens in ``script`` must be distinct and not 6561.

    Returns:
        ``model_dir`` as a Path.
    """
    return _write(Path(model_dir), scripted_t3_state(script, n_layers, seed, hidden, intermediate))


def scripted_t3_state(
    script: Sequence[int],
    n_layers: int = 1,
    seed: int = 0,
    hidden: int = 256,
    intermediate: int = 512,
    text_vocab: int = TEXT_VOCAB,
) -> dict[str, torch.Tensor]:
    """The state dict :func:`write_scripted_t3_checkpoint` writes (any text vocabulary size)."""
    check_script(script, hidden)
    state = random_t3_state(n_layers, seed, hidden, intermediate, text_vocab)
    for i in range(n_layers):
        state[f"tfmr.layers.{i}.self_attn.o_proj.weight"].zero_()
        state[f"tfmr.layers.{i}.mlp.down_proj.weight"].zero_()
    state["speech_pos_emb.emb.weight"].zero_()
    wire_script(state, script)
    return state


def check_script(script: Sequence[int], hidden: int) -> None:
    """Refuse a script a chain cannot hold: repeated tokens, the start token, too many."""
    if len(set(script)) != len(script) or START_SPEECH in script:
        raise ValueError("script tokens must be distinct and not the start token")
    if len(script) >= hidden:
        raise ValueError("script too long")


def wire_script(state: dict[str, torch.Tensor], script: Sequence[int]) -> None:
    """Point each token's speech embedding along its own axis and map that axis, in the speech
    head, to the next scripted token: ``6561 -> script[0] -> script[1] -> ...`` (any T3 whose
    blocks pass the embedding through)."""
    emb, head = state["speech_emb.weight"], state["speech_head.weight"]
    chain = [START_SPEECH, *script]
    for axis, (prev, nxt) in enumerate(zip(chain, chain[1:], strict=False)):
        emb[prev] = 0.0
        emb[prev, axis] = 10.0
        head[nxt, axis] = 20.0


def write_scripted_model_dir(
    model_dir: str | Path, s3gen_model_dir: Path, script: Sequence[int], **t3_options
) -> Path:
    """A whole model folder: the S3Gen, voice-encoder and conds files of ``s3gen_model_dir``
    (linked, not copied) beside a scripted T3 (see :func:`write_scripted_t3_checkpoint`)."""
    model_dir = Path(model_dir)
    for name in ("s3gen.safetensors", "ve.safetensors", "conds.pt"):
        (model_dir / name).symlink_to(s3gen_model_dir / name)
    return write_scripted_t3_checkpoint(model_dir, script, **t3_options)
