"""The Chatterbox models one engine can serve (``TTS_MODEL``) and what differs between them.

Every model is T3 (text and voice to 25 Hz speech tokens) followed by S3Gen (tokens to 24 kHz
audio), with the same voice encoder and the same streaming machinery. What differs, per
upstream (resemble-ai/chatterbox ``tts.py``, ``tts_turbo.py``, ``mtl_tts.py``):

- ``chatterbox`` (Original, English): Llama T3 with guidance and exaggeration; S3Gen's flow
  runs 10 Euler steps with classifier-free guidance.
- ``chatterbox-turbo``: a GPT-2 medium T3 (GPT-2 tokenizer, paralinguistic tags, no guidance,
  no exaggeration, no min-p; top-k 1000 and top-p 0.95), a 15 s / 375-token T3 voice prompt,
  and a distilled meanflow S3Gen (2 steps, no guidance) that ends each utterance on three
  silence tokens.
- ``chatterbox-multilingual``: the Original's Llama T3 with a 2454-entry text vocabulary, a
  language token in front of the text and per-language text preparation (see
  ``multilingual.text``); the Original's S3Gen, voice encoder and voice conditionals. Upstream's
  current ``mtl_tts.py`` uses repetition penalty 1.2 (2.0 before resemble-ai/chatterbox#516) and
  drops the last speech token's audio (emitted just before the stop token, it decodes to ~40 ms
  of noise). Two sets of T3 weights, as upstream's ``t3_model`` argument: ``v2`` (the default,
  ``t3_mtl23ls_v2.safetensors``) and ``v3`` (``t3_mtl23ls_v3.safetensors``, "reduced
  hallucination"; same architecture, everything else shared), see
  :func:`with_multilingual_weights`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

#: S3Gen's silence token (upstream ``S3GEN_SIL``); Turbo appends three before decoding.
S3GEN_SILENCE = 4299

TURBO_TAGS = (
    "[laugh]",
    "[chuckle]",
    "[sigh]",
    "[gasp]",
    "[cough]",
    "[groan]",
    "[sniff]",
    "[shush]",
    "[clear throat]",
)
"""Turbo's sound tags (upstream README and model card); the model's tokenizer holds each as
one token. Turbo's ten delivery tags (``[whispering]``, ``[angry]``, ...) are left out: reports
disagree on whether they have any effect (resemble-ai/chatterbox#557)."""

MULTILINGUAL_LANGUAGES = (
    "ar", "da", "de", "el", "en", "es", "fi", "fr", "he", "hi", "it", "ja",
    "ko", "ms", "nl", "no", "pl", "pt", "ru", "sv", "sw", "tr", "zh",
)  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """One Chatterbox model: files, decoding constants and what a request may change.

    Parameters:
        name: ``TTS_MODEL`` value.
        repo_id: Hugging Face repository of the weights.
        revision: Revision downloaded (a commit where one is pinned).
        t3_file: T3 weights file.
        s3gen_file: S3Gen weights file.
        tokenizer_files: Text tokenizer files.
        flow_steps: S3Gen flow steps by default.
        meanflow: Whether S3Gen is the distilled meanflow decoder (no guidance).
        silence_tokens: Tokens appended to every utterance before its final chunk.
        languages: ISO 639-1 codes the model speaks.
        parameters: The synthesis parameters the model applies.
        tags: Paralinguistic tags the model performs.
        conds_file: Per-voice conditionals file (each model conditions T3 on its own
            reference length, so a voice keeps one file per model).
        t3_reference_seconds: Seconds of reference tokenized for T3's speech prompt.
        t3_prompt_tokens: Most speech tokens in T3's prompt.
        top_p: T3 nucleus threshold.
        min_p: T3 min-p (0: off).
        top_k: T3 top-k (0: off).
        repetition_penalty: T3 repetition penalty.
        trim_final_token: Drop the audio of the last speech token of each utterance.
        reference_lufs: Loudness a voice's reference is normalised to before conditioning
            (upstream Turbo: -27 LUFS), or None.
        untimed_languages: Languages whose text T3 reads respelled (Cangjie codes, kana, jamo),
            so that its text alignment no longer maps to the client's words: no word
            timestamps there.
    """

    name: str
    repo_id: str
    revision: str
    t3_file: str
    s3gen_file: str
    tokenizer_files: tuple[str, ...]
    flow_steps: int
    meanflow: bool
    silence_tokens: tuple[int, ...]
    languages: tuple[str, ...]
    parameters: tuple[str, ...]
    tags: tuple[str, ...]
    conds_file: str
    t3_reference_seconds: float
    t3_prompt_tokens: int
    top_p: float
    min_p: float
    top_k: int
    repetition_penalty: float
    trim_final_token: bool = False
    reference_lufs: float | None = None
    untimed_languages: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        """Returns: every file a model folder must hold."""
        return (self.t3_file, self.s3gen_file, "ve.safetensors", *self.tokenizer_files, "conds.pt")

    @property
    def default_language(self) -> str:
        """Returns: the language of a request that names none: ``en``, else the first."""
        return "en" if "en" in self.languages else self.languages[0]


ORIGINAL = ModelSpec(
    name="chatterbox",
    repo_id="ResembleAI/chatterbox",
    revision="1b475dffa71fb191cb6d5901215eb6f55635a9b6",  # chatterbox-vllm 0.2.1's pin
    t3_file="t3_cfg.safetensors",
    s3gen_file="s3gen.safetensors",
    tokenizer_files=("tokenizer.json",),
    flow_steps=10,
    meanflow=False,
    silence_tokens=(),
    languages=("en",),
    parameters=("exaggeration", "cfg_weight", "temperature", "seed"),
    tags=(),
    conds_file="conds.pt",
    t3_reference_seconds=6.0,
    t3_prompt_tokens=150,
    top_p=1.0,
    min_p=0.05,
    top_k=0,
    repetition_penalty=1.2,
)

TURBO = ModelSpec(
    name="chatterbox-turbo",
    repo_id="ResembleAI/chatterbox-turbo",
    # The commit other public deployments pin with the files' SHA-256 (t3_turbo_v1 1,915,480,052
    # bytes); not checked from here, where the hub cannot be reached.
    revision="749d1c1a46eb10492095d68fbcf55691ccf137cd",
    t3_file="t3_turbo_v1.safetensors",
    s3gen_file="s3gen_meanflow.safetensors",
    tokenizer_files=("vocab.json", "merges.txt", "added_tokens.json"),
    flow_steps=2,
    meanflow=True,
    silence_tokens=(S3GEN_SILENCE,) * 3,
    languages=("en",),
    parameters=("temperature", "seed"),
    tags=TURBO_TAGS,
    conds_file="conds-turbo.pt",
    t3_reference_seconds=15.0,
    t3_prompt_tokens=375,
    top_p=0.95,
    min_p=0.0,
    top_k=1000,
    repetition_penalty=1.2,
    reference_lufs=-27.0,
)

# Upstream conditions the multilingual T3 exactly as the Original (6 s, 150 tokens, the same
# voice encoder and S3Gen), so everything not named here is the Original's, conds.pt included:
# a voice's conditionals are shared with the Original's.
MULTILINGUAL = dataclasses.replace(
    ORIGINAL,
    name="chatterbox-multilingual",
    revision="05e904af2b5c7f8e482687a9d7336c5c824467d9",  # chatterbox-vllm 0.2.1's pin
    t3_file="t3_mtl23ls_v2.safetensors",
    # Cangjie5_TC.json: the character-to-Cangjie table Chinese text is spelled with
    tokenizer_files=("grapheme_mtl_merged_expanded_v1.json", "Cangjie5_TC.json"),
    languages=MULTILINGUAL_LANGUAGES,
    trim_final_token=True,
    untimed_languages=("ja", "ko", "zh"),
)

MODELS = {spec.name: spec for spec in (ORIGINAL, TURBO, MULTILINGUAL)}

#: The multilingual T3 weights (``TTS_MULTILINGUAL_WEIGHTS``): file, and the commit to download
#: it from. v3's commit is the one public deployments of v3 pin (upstream's own loader fetches
#: ``main``); not checked from here, where the hub cannot be reached.
MULTILINGUAL_WEIGHTS = {
    "v2": ("t3_mtl23ls_v2.safetensors", MULTILINGUAL.revision),
    "v3": ("t3_mtl23ls_v3.safetensors", "5bb1f6ee58e50c3b8d408bc82a6d3740c2db6e18"),
}


def with_multilingual_weights(spec: ModelSpec, weights: str) -> ModelSpec:
    """The multilingual spec with the T3 weights ``weights`` (``v2`` or ``v3``).

    Raises:
        ValueError: For another model, or unknown weights.
    """
    if weights not in MULTILINGUAL_WEIGHTS:
        raise ValueError(
            f"unknown multilingual weights {weights!r} (one of {', '.join(MULTILINGUAL_WEIGHTS)})"
        )
    if spec.t3_file not in {file for file, _ in MULTILINGUAL_WEIGHTS.values()}:
        raise ValueError(f"{spec.name} has no multilingual weights to choose")
    t3_file, revision = MULTILINGUAL_WEIGHTS[weights]
    return dataclasses.replace(spec, t3_file=t3_file, revision=revision)


def model_spec(name: str) -> ModelSpec:
    """The spec of a ``TTS_MODEL`` value.

    Raises:
        ValueError: For an unknown name.
    """
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r} (one of {', '.join(MODELS)})") from None
