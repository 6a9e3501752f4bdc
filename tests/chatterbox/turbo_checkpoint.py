"""Write Chatterbox-Turbo model files for tests: the real file names, keys and shapes.

A Turbo folder (``ResembleAI/chatterbox-turbo``) holds ``t3_turbo_v1.safetensors`` (T3 with a
GPT-2 medium backbone, loaded by upstream with a strict ``load_state_dict``, so exactly the keys
of its ``T3`` module with ``GPT2Model``), ``s3gen_meanflow.safetensors`` (S3Gen with the meanflow
estimator's ``time_embed_mixer``), ``ve.safetensors``, ``conds.pt`` and GPT-2 slow-tokenizer
files (``vocab.json``, ``merges.txt``, ``added_tokens.json``, ``special_tokens_map.json``,
``tokenizer_config.json``).

Weights are random (seeded), narrower and shallower than the real 1024 x 24 unless asked; the
vocabularies are the real sizes. The tokenizer is a small byte-level BPE trained here, padded
to GPT-2's 50257 ids, plus Turbo's 19 added tags at 50257-50275, so ids and the file format are
the real ones while the merges are not GPT-2's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from .t3_checkpoint import check_script, wire_script

TEXT_VOCAB = 50276
SPEECH_VOCAB = 6563
POSITIONS = 8196
SPEAKER = 256
ADDED_TAGS = (
    "[clear throat]", "[sigh]", "[shush]", "[cough]", "[groan]", "[sniff]", "[gasp]",
    "[chuckle]", "[laugh]", "[whispering]", "[angry]", "[fear]", "[surprised]", "[crying]",
    "[happy]", "[sarcastic]", "[dramatic]", "[narration]", "[advertisement]",
)  # fmt: skip
_CORPUS = [
    "Hello there, how are you today? I am fine, thank you very much.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please hold on while I look up your account and the billing issue.",
    "We can talk about the weather, the news, or anything else you like.",
    "Numbers like one, two and three are spelled out before speaking.",
] * 4


def write_turbo_tokenizer(folder: Path) -> Path:
    """Write GPT-2 style tokenizer files with Turbo's 50276 ids into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tok.model.save(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    filler = len(vocab)
    while len(vocab) < 50256:
        vocab[f"<unused{filler}>"] = len(vocab)
        filler += 1
    vocab["<|endoftext|>"] = 50256
    (folder / "vocab.json").write_text(json.dumps(vocab))
    added = {tag: 50257 + i for i, tag in enumerate(ADDED_TAGS)}
    (folder / "added_tokens.json").write_text(json.dumps(added))
    eos = "<|endoftext|>"
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": eos, "eos_token": eos, "unk_token": eos})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 1024, "tokenizer_class": "GPT2Tokenizer"})
    )
    return folder


def random_turbo_t3_state(
    n_layers: int = 2, hidden: int = 128, intermediate: int = 512, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A Turbo T3 state dict with the real keys (``n_layers`` GPT-2 blocks), random values."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    state = {
        "cond_enc.spkr_enc.weight": rnd(hidden, SPEAKER),
        "cond_enc.spkr_enc.bias": rnd(hidden),
        "text_emb.weight": rnd(TEXT_VOCAB, hidden),
        "speech_emb.weight": rnd(SPEECH_VOCAB, hidden),
        "text_head.weight": rnd(TEXT_VOCAB, hidden),
        "speech_head.weight": rnd(SPEECH_VOCAB, hidden),
        "speech_head.bias": rnd(SPEECH_VOCAB),
        "tfmr.wte.weight": rnd(TEXT_VOCAB, hidden),
        "tfmr.wpe.weight": rnd(POSITIONS, hidden, std=0.01),
        "tfmr.ln_f.weight": torch.ones(hidden),
        "tfmr.ln_f.bias": torch.zeros(hidden),
    }
    for i in range(n_layers):
        p = f"tfmr.h.{i}."
        state |= {
            p + "ln_1.weight": 1 + rnd(hidden),
            p + "ln_1.bias": rnd(hidden),
            p + "attn.c_attn.weight": rnd(hidden, 3 * hidden),
            p + "attn.c_attn.bias": rnd(3 * hidden),
            p + "attn.c_proj.weight": rnd(hidden, hidden),
            p + "attn.c_proj.bias": rnd(hidden),
            p + "ln_2.weight": 1 + rnd(hidden),
            p + "ln_2.bias": rnd(hidden),
            p + "mlp.c_fc.weight": rnd(hidden, intermediate),
            p + "mlp.c_fc.bias": rnd(intermediate),
            p + "mlp.c_proj.weight": rnd(intermediate, hidden),
            p + "mlp.c_proj.bias": rnd(hidden),
        }
    return state


def _write_t3(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "t3_turbo_v1.safetensors")
    )
    write_turbo_tokenizer(folder)
    return folder


def write_random_turbo_t3(folder: str | Path, **options) -> Path:
    """Write ``t3_turbo_v1.safetensors`` (random) and the tokenizer files into ``folder``."""
    return _write_t3(Path(folder), random_turbo_t3_state(**options))


def write_scripted_turbo_t3(
    folder: str | Path,
    script: Sequence[int],
    n_layers: int = 1,
    hidden: int = 256,
    intermediate: int = 256,
    seed: int = 0,
) -> Path:
    """Write a Turbo T3 that speaks ``script`` after start-of-speech, whatever the text and voice.

    Every block's output projections (weights and biases) and the position table are zeroed,
    so the final hidden state is the normalised embedding of the fed token; each scripted
    token's embedding points along its own axis and the speech head maps that axis to the next
    scripted token with a large logit: a fixed chain ``6561 -> script[0] -> script[1] -> ...``.
    Tokens in ``script`` must be distinct and not 6561.
    """
    check_script(script, hidden)
    state = random_turbo_t3_state(n_layers, hidden, intermediate, seed)
    for i in range(n_layers):
        for name in ("attn.c_proj", "mlp.c_proj"):
            state[f"tfmr.h.{i}.{name}.weight"].zero_()
            state[f"tfmr.h.{i}.{name}.bias"].zero_()
    state["tfmr.wpe.weight"].zero_()
    state["speech_head.bias"].zero_()
    wire_script(state, script)
    return _write_t3(Path(folder), state)


def write_meanflow_s3gen(folder: Path, s3gen_file: Path, seed: int = 0) -> Path:
    """Write ``s3gen_meanflow.safetensors``: an S3Gen file's weights plus the meanflow mixer.

    Upstream initialises the mixer to pass the start time's embedding through (IntMeanFlow's
    diagonal init); here it is random, so both times matter.
    """
    from safetensors.torch import load_file

    state = load_file(str(s3gen_file))
    dim = state["flow.decoder.estimator.time_mlp.linear_2.weight"].shape[0]
    gen = torch.Generator().manual_seed(seed)
    state["flow.decoder.estimator.time_embed_mixer.weight"] = (
        torch.randn(dim, 2 * dim, generator=gen) * 0.03
    )
    path = Path(folder) / "s3gen_meanflow.safetensors"
    save_file(state, str(path))
    return path


def write_turbo_model_dir(
    folder: str | Path, s3gen_model_dir: Path, script: Sequence[int] | None = None, **t3_options
) -> Path:
    """A whole Turbo folder: the voice encoder and ``conds.pt`` of ``s3gen_model_dir`` (linked),
    a meanflow S3Gen (its S3Gen weights plus a random mixer; linked when ``s3gen_model_dir``
    already holds one) and a scripted (or, without ``script``, random) Turbo T3."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("ve.safetensors", "conds.pt"):
        (folder / name).symlink_to(s3gen_model_dir / name)
    meanflow = s3gen_model_dir / "s3gen_meanflow.safetensors"
    if meanflow.is_file():
        (folder / meanflow.name).symlink_to(meanflow)
    else:
        write_meanflow_s3gen(folder, s3gen_model_dir / "s3gen.safetensors")
    if script is None:
        return write_random_turbo_t3(folder, **t3_options)
    return write_scripted_turbo_t3(folder, script, **t3_options)
