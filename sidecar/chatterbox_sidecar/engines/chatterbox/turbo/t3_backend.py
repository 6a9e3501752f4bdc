"""Turbo's T3 backend: batched decoding of all active requests, one cache slot per request.

:class:`TurboT3BatchDecoder` has the interface the ``torch`` backend's decode thread drives
(``add_batch``, ``step``, ``remove``, ``free_slots``, ``slots_needed``, ``active_ids``), so
:class:`TurboT3Backend` reuses that thread, inbox and token streams unchanged and only loads a
Turbo model and decoder. Differences from the Original's decoder, as upstream's
``T3.inference_turbo``:

- no guidance: one slot per request, ``cfg_weight`` and ``exaggeration`` are not used;
- sampling order temperature, top-k (1000), top-p, then the repetition penalty over the tokens
  generated so far (the first draw penalises the start-of-speech token, later ones do not);
- no min-p; stop token 6562; ids >= 6561 are never passed on as speech.

Each row samples with its own parameters and counter-based noise (see ``t3.sampling``), so a
request draws the same tokens alone or in a batch. On CUDA the decode step replays CUDA graphs
bucketed by rows and attended cache length, as the Original's does.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import Tensor

from chatterbox_sidecar.engines.chatterbox.t3.backend import T3Request
from chatterbox_sidecar.engines.chatterbox.t3.model import T3KVCache
from chatterbox_sidecar.engines.chatterbox.t3.sampling import (
    draw,
    repetition_penalty,
    top_p_filter,
)
from chatterbox_sidecar.engines.chatterbox.t3.slots import (
    ConditioningCache,
    DecodeGraph,
    SlotDecoder,
)
from chatterbox_sidecar.engines.chatterbox.t3.torch_backend import (
    StepOutput,
    TorchT3Backend,
)
from chatterbox_sidecar.engines.chatterbox.turbo.t3_model import (
    START_SPEECH_TOKEN,
    STOP_SPEECH_TOKEN,
    TurboT3Model,
)
from chatterbox_sidecar.engines.chatterbox.turbo.text import TurboTokenizer

T3_FILE = "t3_turbo_v1.safetensors"
#: Upstream ``generate`` defaults.
DEFAULT_TOP_K = 1000
#: Per-slot sampling parameters, as :class:`T3Request` fields (rows of ``_params``).
PARAMS = ("repetition_penalty", "temperature", "top_p")


def turbo_sample(
    logits: Tensor,
    seen: Tensor,
    params: Tensor,
    top_k: int,
    seeds: Tensor,
    steps: Tensor,
) -> Tensor:
    """One sampling step in upstream Turbo's order: temperature, top-k, top-p, penalty, draw.

    Args:
        logits: Float32 [B, V].
        seen: Tokens each row penalises [B, V] (bool).
        params: Float32 [3, B]: repetition penalty, temperature, top-p (see :data:`PARAMS`).
        top_k: Tokens kept by top-k (0: off).
        seeds: Int64 seed of each row [B].
        steps: Int64 step of each row [B].

    Returns:
        The tokens [B] (int64). Rows with temperature <= 0 are greedy.
    """
    penalty, temperature, top_p = params
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    logits = logits / scale[:, None]
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logits = top_p_filter(logits, top_p)
    logits = repetition_penalty(logits, seen, penalty)
    return draw(logits, temperature <= 0, seeds, steps)


@dataclass
class _Active:
    request: T3Request
    slot: int
    position: int  # sequence position of the next fed token (= keys in the cache)
    budget: int
    generated: int = 0
    last_token: int = START_SPEECH_TOKEN


class TurboT3BatchDecoder(SlotDecoder):
    """Batched Turbo T3 decoding over a fixed pool of KV-cache slots (one per request).

    Args:
        model: The loaded model.
        tokenizer: Its GPT-2 tokenizer.
        max_batch_size: Requests decoded at once.
        max_seq_len: Longest prompt plus speech sequence a slot holds.
        top_k: Top-k of every request (upstream: 1000).
        kv_bucket: Attended cache lengths of the decode graphs are multiples of this.
    """

    def __init__(
        self,
        model: TurboT3Model,
        tokenizer: TurboTokenizer,
        *,
        max_batch_size: int = 8,
        max_seq_len: int = 1536,
        top_k: int = DEFAULT_TOP_K,
        kv_bucket: int = 256,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = min(max_seq_len, model.config.n_positions)
        self.top_k = top_k
        self.kv_bucket = kv_bucket
        self.n_slots = max_batch_size
        device = model.device
        self.cache = T3KVCache(model.config, max_batch_size, self.max_seq_len, device, model.dtype)
        vocab = model.config.speech_vocab_size
        self._seen = torch.zeros(max_batch_size, vocab, dtype=torch.bool, device=device)
        self._params = torch.ones(len(PARAMS), max_batch_size, device=device)
        self._seeds = torch.zeros(max_batch_size, dtype=torch.long, device=device)
        self._free = list(range(max_batch_size))
        self._active: dict[str, _Active] = {}
        self._conds = ConditioningCache()
        self._graphs: dict[tuple[int, int], DecodeGraph[Tensor]] = {}

    # ---- the interface the decode thread uses

    def step(self) -> list[StepOutput]:
        """Sample one token for every active request in one backbone pass."""
        states = list(self._active.values())
        if not states:
            return []
        rows = 1 + max(s.slot for s in states)
        inputs = [[0] * rows, [0] * rows, [0] * rows]
        for s in states:
            inputs[0][s.slot] = s.last_token
            inputs[1][s.slot] = s.generated
            inputs[2][s.slot] = s.position
        kv_len = 1 + max(s.position for s in states)
        tensor = torch.tensor(inputs, device=self.model.device)
        graph = self._graph_for(rows, kv_len)
        picked = graph.run(tensor) if graph is not None else self.decode_and_sample(tensor, kv_len)
        picked_rows = picked.tolist()
        for s in states:
            s.position += 1
        return self._advance(states, [picked_rows[s.slot] for s in states])

    def remove(self, request_id: str) -> None:
        """Drop a request and free its slot (no-op for unknown ids)."""
        state = self._active.pop(request_id, None)
        if state is not None:
            self._free.append(state.slot)

    # ---- internals

    def _text_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        vocab = self.model.config.text_vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise ValueError(
                f"text token id {bad} is outside Turbo T3's text vocabulary ({vocab}); the "
                "tokenizer files do not match the T3 weights"
            )
        return ids

    def _conditioning(self, request: T3Request) -> Tensor:
        """A voice's conditioning rows, computed once while its speaker tensor lives."""
        conds = request.conditionals
        get = conds.get if isinstance(conds, dict) else lambda name: getattr(conds, name, None)
        speaker = get("speaker_emb")
        if speaker is None:
            raise ValueError("conditionals have no speaker_emb")
        prompt = get("cond_prompt_speech_tokens")
        return self._conds.get(speaker, None, lambda: self.model.conditioning(speaker, prompt))

    def _admit(self, request: T3Request) -> tuple[_Active, Tensor]:
        if request.request_id in self._active:
            raise ValueError(f"request {request.request_id!r} is already running")
        if not self._free:
            raise ValueError("no free KV-cache slots")
        text_ids = torch.tensor(self._text_ids(request.text), dtype=torch.long)
        row = self.model.prompt_embeds(self._conditioning(request), text_ids)
        length = row.shape[0]
        if length >= self.max_seq_len:
            raise ValueError(
                f"prompt of {length} tokens does not fit max_seq_len={self.max_seq_len}"
            )
        budget = min(request.max_new_tokens, self.max_seq_len - length)
        if budget < request.max_new_tokens:
            logger.warning(
                f"Turbo T3 request {request.request_id}: speech budget cut from "
                f"{request.max_new_tokens} to {budget} tokens (max_seq_len={self.max_seq_len})"
            )
        slot = min(self._free)
        self._free.remove(slot)
        state = _Active(request, slot, length, max(budget, 1))
        self._active[request.request_id] = state
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        values = [float(getattr(request, name)) for name in PARAMS]
        self._params[:, slot] = torch.tensor(values, device=self.model.device)
        self._seeds[slot] = seed
        self._seen[slot] = False
        self._seen[slot, START_SPEECH_TOKEN] = True  # upstream's first draw sees the start token
        return state, row

    def _prefill(self, batch: list[tuple[_Active, Tensor]]) -> list[StepOutput]:
        model = self.model
        device = model.device
        longest = max(row.shape[0] for _, row in batch)
        embeds = batch[0][1].new_zeros(len(batch), longest, batch[0][1].shape[1])
        for k, (_, row) in enumerate(batch):
            embeds[k, : row.shape[0]] = row
        lengths = torch.tensor([row.shape[0] for _, row in batch], device=device)
        slots = torch.tensor([state.slot for state, _ in batch], device=device)
        hidden = model.prefill(embeds, self.cache, slots, lengths)
        steps = torch.zeros(len(batch), dtype=torch.long, device=device)
        tokens = turbo_sample(
            model.logits(hidden),
            self._seen[slots],
            self._params[:, slots],
            self.top_k,
            self._seeds[slots],
            steps,
        )
        # From here on the penalty covers the generated tokens only (upstream's input_ids).
        self._seen[slots] = False
        self._seen.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.bool))
        return self._advance([state for state, _ in batch], tokens.tolist())

    def decode_and_sample(self, inputs: Tensor, kv_len: int) -> Tensor:
        """The device work of one step for the first ``R`` slots (what a graph records).

        Args:
            inputs: Int64 [3, R]: each slot's fed token, step (tokens generated) and sequence
                position.
            kv_len: Keys to attend over, greater than every position.

        Returns:
            Each slot's sampled token [R], also marked in its repetition-penalty set.
        """
        model = self.model
        n = inputs.shape[1]
        hidden = model.decode(model.speech_embeds(inputs[0]), inputs[2], self.cache, kv_len)
        slots = torch.arange(n, device=inputs.device)
        tokens = turbo_sample(
            model.logits(hidden),
            self._seen[:n],
            self._params[:, :n],
            self.top_k,
            self._seeds[:n],
            inputs[1],
        )
        self._seen.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.bool))
        return tokens

    def _advance(self, states: list[_Active], picked: list[int]) -> list[StepOutput]:
        outputs = []
        for state, token in zip(states, picked, strict=True):
            state.generated += 1
            state.last_token = token
            finished = token == STOP_SPEECH_TOKEN or state.generated >= state.budget
            outputs.append(StepOutput(state.request.request_id, token, finished))
            if finished:
                self.remove(state.request.request_id)
        return outputs


class TurboT3Backend(TorchT3Backend):
    """Turbo's T3 on the ``torch`` backend's decode thread (see :class:`TorchT3Backend`).

    Args:
        model_dir: Folder with ``t3_turbo_v1.safetensors`` and the GPT-2 tokenizer files.
        top_k: Top-k of every request.
        **kwargs: As :class:`TorchT3Backend` (device, dtype, max_batch_size, max_seq_len,
            cuda_graphs, kv_bucket, prefill_batch).
    """

    def __init__(self, model_dir: str | Path, *, top_k: int = DEFAULT_TOP_K, **kwargs: Any):
        super().__init__(model_dir, **kwargs)
        self.top_k = top_k

    def _build_decoder(self) -> TurboT3BatchDecoder:
        """Load Turbo's weights and GPT-2 tokenizer into a Turbo decoder."""
        model = TurboT3Model.from_safetensors(
            self.model_dir / T3_FILE, device=self.device, dtype=self.dtype
        )
        tokenizer = TurboTokenizer(self.model_dir)
        if len(tokenizer) > model.config.text_vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens, Turbo T3's text table "
                f"{model.config.text_vocab_size}"
            )
        return TurboT3BatchDecoder(
            model,
            tokenizer,
            max_batch_size=self.max_batch_size,
            max_seq_len=self.max_seq_len,
            top_k=self.top_k,
            kv_bucket=self.kv_bucket,
        )
