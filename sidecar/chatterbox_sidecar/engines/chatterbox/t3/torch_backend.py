"""The ``torch`` T3 backend: our own T3 inference with batched decoding of all active requests.

Two layers:

- :class:`T3BatchDecoder` (synchronous, one thread): requests join with :meth:`~T3BatchDecoder.add`
  (prefill, first token), :meth:`~T3BatchDecoder.step` samples one more token for every active
  request in one backbone pass, finished requests leave by themselves and cancelled ones with
  :meth:`~T3BatchDecoder.remove`. Each request holds one KV-cache slot for its conditional row
  and, when guidance is on, one for its unconditional row, so both branches keep their context.
- :class:`TorchT3Backend`: runs the decoder in a background thread; requests and cancellations
  arrive through a locked inbox, tokens leave through :class:`~.stream.TokenStream`.

Word timestamps: a request with ``alignment`` gets, with each token, the attention of the
alignment heads (``t3.alignment.alignment_heads``) from the query that predicted it over its
text tokens, conditional row only: ``[heads, n_text]`` float32 on the host. Step 0 is the
prefill's last row (the start-of-speech token). Only requests that asked copy rows to the host;
decode steps where none asked run without the recording (see ``t3.slots``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger
from torch import Tensor

from chatterbox_sidecar.engines.chatterbox.t3 import sampling as t3_sampling
from chatterbox_sidecar.engines.chatterbox.t3.alignment import ALIGNMENT_MODEL, alignment_heads
from chatterbox_sidecar.engines.chatterbox.t3.backend import T3Backend, T3Request
from chatterbox_sidecar.engines.chatterbox.t3.model import (
    SPEECH_VOCAB_VALID,
    START_SPEECH_TOKEN,
    STOP_SPEECH_TOKEN,
    AlignmentCapture,
    T3KVCache,
    T3Model,
)
from chatterbox_sidecar.engines.chatterbox.t3.slots import (
    ConditioningCache,
    DecodeGraph,
    SlotDecoder,
)
from chatterbox_sidecar.engines.chatterbox.t3.stream import TokenStream
from chatterbox_sidecar.engines.chatterbox.t3.text import T3Tokenizer

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """The model dtype: as given, else bfloat16 on CUDA and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (use one of {sorted(_DTYPES)})") from None


def _field(conditionals: Any, name: str) -> Any:
    if isinstance(conditionals, dict):
        return conditionals.get(name)
    return getattr(conditionals, name, None)


# Prefill CUDA graphs: prompt lengths in steps of this, up to PREFILL_GRAPH_MAX_LEN (longer
# prompts prefill eagerly), rows (two per guided request) up to PREFILL_GRAPH_MAX_ROWS.
PREFILL_LEN_BUCKET = 64
PREFILL_GRAPH_MAX_LEN = 384
PREFILL_GRAPH_MAX_ROWS = 32
# Text tokens an aligned request may have (a 300-character piece has at most ~302); a longer
# text is decoded without alignment.
ALIGNMENT_WIDTH = 384


@dataclass
class StepOutput:
    """One sampled token of one request.

    Parameters:
        request_id: The request.
        token: The sampled id (may be >= 6561; only smaller ids are speech).
        finished: True when this was the stop token or the budget's last token.
        logits: The guided logits the token was sampled from (before penalties), when the
            decoder records them.
        alignment: The alignment heads' attention from the query that predicted the token over
            the request's text tokens, float32 ``[heads, n_text]``, when the request asked.
    """

    request_id: str
    token: int
    finished: bool
    logits: Tensor | None = None
    alignment: np.ndarray | None = None


@dataclass
class _Active:
    request: T3Request
    slots: list[int]  # [conditional] or [conditional, unconditional]
    position: int  # sequence position of the next fed token (= keys in the cache)
    budget: int
    generated: int = 0
    last_token: int = START_SPEECH_TOKEN
    finished: bool = False
    n_text: int = 0  # text tokens in the prompt
    aligned: bool = False  # the request's alignment rows are read each step


@dataclass
class _Job:
    request: T3Request
    stream: TokenStream
    cancelled: bool = field(default=False)


class T3BatchDecoder(SlotDecoder):
    """Batched T3 decoding over a fixed pool of KV-cache slots.

    A decode step is one backbone pass over the first ``R`` slots followed by sampling on the
    device (guidance pairs each conditional row with its unconditional partner slot); the
    only host synchronisation is reading the sampled tokens. On CUDA the whole step replays
    as a CUDA graph chosen by row count and attended cache length, both bucketed.

    Args:
        model: The loaded model.
        tokenizer: The text tokenizer.
        max_batch_size: Requests decoded at once (each takes two cache slots with guidance).
        max_seq_len: Longest prompt plus speech sequence a slot holds.
        record_logits: Attach the guided logits to each :class:`StepOutput` (for tests).
        kv_bucket: Attended cache lengths are rounded up to a multiple of this (CUDA graphs
            attend over the bucket, not the whole cache).
        alignment: Record the alignment heads for requests that ask (word timestamps); False
            captures no alignment graphs.
        alignment_width: Most text tokens of an aligned request.
    """

    def __init__(
        self,
        model: T3Model,
        tokenizer: T3Tokenizer,
        *,
        max_batch_size: int = 8,
        max_seq_len: int = 1536,
        record_logits: bool = False,
        kv_bucket: int = 256,
        alignment: bool = True,
        alignment_width: int = ALIGNMENT_WIDTH,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.record_logits = record_logits
        self.kv_bucket = kv_bucket
        self._graphs: dict[tuple[int, int], DecodeGraph[tuple[Tensor, Tensor]]] = {}
        self._prefill_graphs: dict[tuple[int, int], _PrefillGraph] = {}
        n_slots = 2 * max_batch_size
        self.n_slots = n_slots
        device = model.device
        # One slot more than requests take: the scratch slot that padding rows of a graphed
        # prefill write into (never decoded, never handed out).
        self._scratch_slot = n_slots
        self.cache = T3KVCache(model.config, n_slots + 1, max_seq_len, device, model.dtype)
        # A voice's conditioning rows per exaggeration: the perceiver runs once per voice,
        # not once per request.
        self._conds = ConditioningCache()
        self._seen = torch.zeros(
            n_slots, model.config.speech_vocab_size, dtype=torch.bool, device=device
        )
        # Per slot, on the device (set when a request takes the slot): sampling parameters
        # (rows as t3_sampling.PARAMS), seed, and the partner slot guidance subtracts.
        self._params = torch.ones(len(t3_sampling.PARAMS), n_slots, device=device)
        self._seeds = torch.zeros(n_slots, dtype=torch.long, device=device)
        self._partner = torch.arange(n_slots, device=device)
        self._free = list(range(n_slots))
        self._active: dict[str, _Active] = {}
        self._align = self._alignment_capture(alignment_width) if alignment else None
        self.aligns = self._align is not None

    def _alignment_capture(self, width: int) -> AlignmentCapture:
        """The static buffers that prefill and decode write the alignment heads into."""
        config = self.model.config
        heads = alignment_heads(config.n_layers, config.n_heads)
        if (config.n_layers, config.n_heads) != ALIGNMENT_MODEL:
            logger.warning(
                f"T3 of {config.n_layers} layers x {config.n_heads} heads: the alignment heads "
                f"are upstream's for {ALIGNMENT_MODEL[0]} x {ALIGNMENT_MODEL[1]}; recording "
                f"{heads} instead, whose word timings mean nothing"
            )
        device = self.model.device
        rows = self.n_slots + 1  # every slot, and every row of a prefill (scratch included)
        return AlignmentCapture(
            heads=heads,
            text_start=torch.zeros(rows, dtype=torch.long, device=device),
            out=torch.zeros(rows, len(heads), width, dtype=torch.float32, device=device),
        )

    def text_tokens(self, text: str, language: str = "en") -> list[str]:
        """The text tokens T3 reads for ``text``, as strings (``[START]`` ... ``[STOP]``)."""
        raw = self.tokenizer._tokenizer  # the tokenizers.Tokenizer behind T3Tokenizer
        return [raw.id_to_token(i) for i in self.tokenizer.encode(text, language)]

    @property
    def prefill_graph_keys(self) -> list[tuple[int, int]]:
        """(rows, padded prompt length) of each captured prefill graph."""
        return sorted(self._prefill_graphs)

    def slots_needed(self, request: T3Request) -> int:
        """Cache slots ``request`` takes (two with guidance, one without)."""
        return 2 if request.cfg_weight != 0 else 1

    def decode_rows(self, requests: int) -> int:
        """Rows a decode step of ``requests`` guided requests runs over (two each)."""
        return min(2 * requests, self.n_slots)

    def _text_ids(self, text: str, language: str | None = None) -> list[int]:
        """Token ids of ``text``, checked on the host against the model's tables.

        An id past the text embedding or a prompt past the text position table would index
        out of range on the GPU: a device-side assert that poisons the whole process.

        Raises:
            ValueError: If an id or the length is out of range.
        """
        ids = self.tokenizer.encode(text, language)
        config = self.model.config
        if len(ids) > config.text_positions:
            raise ValueError(
                f"text of {len(ids)} tokens exceeds T3's {config.text_positions} text positions"
            )
        bad = next((i for i in ids if not 0 <= i < config.text_vocab_size), None)
        if bad is not None:
            raise ValueError(
                f"text token id {bad} is outside T3's text vocabulary ({config.text_vocab_size}); "
                "tokenizer.json does not match t3_cfg.safetensors"
            )
        return ids

    def _admit(self, request: T3Request) -> tuple[_Active, list[Tensor]]:
        """Check ``request``, embed its prompt rows, and give it slots and parameters."""
        if request.request_id in self._active:
            raise ValueError(f"request {request.request_id!r} is already running")
        if not self.can_admit(request):
            raise ValueError("no free KV-cache slots")
        model = self.model
        text_ids = torch.tensor(self._text_ids(request.text, request.language), dtype=torch.long)
        cond = self._conditioning(request)
        rows = [model.prompt_embeds(cond, text_ids, unconditional=False)]
        if request.cfg_weight != 0:
            rows.append(model.prompt_embeds(cond, text_ids, unconditional=True))
        length = rows[0].shape[0]
        if length >= self.max_seq_len:
            raise ValueError(
                f"prompt of {length} tokens does not fit max_seq_len={self.max_seq_len}"
            )
        budget = min(
            request.max_new_tokens,
            self.max_seq_len - length,
            model.config.speech_positions - 1,
        )
        if budget < request.max_new_tokens:
            logger.warning(
                f"T3 request {request.request_id}: speech budget cut from "
                f"{request.max_new_tokens} to {budget} tokens (max_seq_len={self.max_seq_len})"
            )
        slots = sorted(self._free)[: len(rows)]
        for slot in slots:
            self._free.remove(slot)
        n_text = len(text_ids)
        aligned = request.alignment and self._align is not None
        if aligned and n_text > self._align.out.shape[2]:
            logger.warning(
                f"T3 request {request.request_id}: {n_text} text tokens, more than the "
                f"{self._align.out.shape[2]} alignment covers; no word timings for it"
            )
            aligned = False
        state = _Active(request, slots, length, max(budget, 1), n_text=n_text, aligned=aligned)
        self._active[request.request_id] = state
        self._assign(request, slots)
        if self._align is not None:
            self._align.text_start[slots] = cond.shape[0]
        return state, rows

    def _prefill(self, batch: list[tuple[_Active, list[Tensor]]]) -> list[StepOutput]:
        """One right-padded prefill pass over every row of ``batch``; first tokens sampled."""
        model = self.model
        rows = [row for _, state_rows in batch for row in state_rows]
        slots = [slot for state, _ in batch for slot in state.slots]
        longest = max(row.shape[0] for row in rows)
        embeds = rows[0].new_zeros(len(rows), longest, rows[0].shape[1])
        for k, row in enumerate(rows):
            embeds[k, : row.shape[0]] = row
        device = model.device
        lengths = torch.tensor([row.shape[0] for row in rows], device=device)
        slot_ids = torch.tensor(slots, device=device)
        states = [state for state, _ in batch]
        # Prefill graphs always record the alignment heads (a few small products against a
        # whole pass over the prompts, once per request); eager prefill only when asked.
        graph = self._prefill_graph_for(len(rows), longest)
        if graph is not None:
            hidden = graph.run(embeds, slot_ids, lengths)
        else:
            align = self._align if any(s.aligned for s in states) else None
            hidden = model.prefill(embeds, self.cache, slot_ids, lengths, align)
        logits = model.logits(hidden)
        cond_rows, uncond_rows, k = [], [], 0
        for state, _ in batch:
            cond_rows.append(k)
            uncond_rows.append(k + len(state.slots) - 1)
            k += len(state.slots)
        heads = torch.tensor([s.slots[0] for s in states], device=device)
        steps = torch.zeros(len(states), dtype=torch.long, device=device)
        tokens, guided = self._sample_slots(logits[cond_rows], logits[uncond_rows], heads, steps)
        alignment = self._read_alignment(states, cond_rows)
        return self._advance(states, tokens.tolist(), guided, alignment)

    def step(self) -> list[StepOutput]:
        """Sample one token for every active request in one backbone pass."""
        states = list(self._active.values())
        if not states:
            return []
        rows = 1 + max(slot for s in states for slot in s.slots)
        tokens, positions, speech_pos = [0] * rows, [0] * rows, [0] * rows
        for s in states:
            for slot in s.slots:
                tokens[slot] = s.last_token
                positions[slot] = s.position
                speech_pos[slot] = s.generated
        kv_len = 1 + max(s.position for s in states)
        inputs = torch.tensor([tokens, speech_pos, positions], device=self.model.device)
        align = any(s.aligned for s in states)
        graph = self._graph_for(rows, kv_len, align)
        if graph is not None:
            picked, guided = graph.run(inputs)
        else:
            picked, guided = self.decode_and_sample(inputs, kv_len, align=align)
        picked_rows = picked.tolist()
        for s in states:
            s.position += 1
        heads = [picked_rows[s.slots[0]] for s in states]
        if self.record_logits:
            guided = guided[[s.slots[0] for s in states]]
        alignment = self._read_alignment(states, [s.slots[0] for s in states])
        return self._advance(states, heads, guided, alignment)

    def _read_alignment(self, states: list[_Active], rows: list[int]) -> list[np.ndarray | None]:
        """Copy the aligned requests' rows of the alignment buffer to the host.

        Args:
            states: The requests of the pass.
            rows: Each one's conditional row in the buffer (its slot, or its prefill row).

        Returns:
            Per request, ``[heads, n_text]`` float32, or None where it did not ask.
        """
        wanted = [i for i, s in enumerate(states) if s.aligned]
        out: list[np.ndarray | None] = [None] * len(states)
        if not wanted:
            return out
        assert self._align is not None
        width = max(states[i].n_text for i in wanted)
        picked = self._align.out[[rows[i] for i in wanted], :, :width].cpu().numpy()
        for k, i in enumerate(wanted):
            out[i] = picked[k, :, : states[i].n_text]
        return out

    def decode_and_sample(
        self, inputs: Tensor, kv_len: int, align: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The device work of one step for the first ``R`` slots (what a graph records).

        Args:
            inputs: Int64 [3, R]: each slot's fed token, speech position and sequence position.
            kv_len: Keys to attend over, greater than every position.
            align: Also write the alignment heads' attention into the alignment buffer.

        Returns:
            Each slot's sampled token [R] and guided logits [R, V]; the tokens are also marked
            in the slots' repetition-penalty sets.
        """
        model = self.model
        n = inputs.shape[1]
        embeds = model.speech_embeds(inputs[0], inputs[1])
        capture = self._align if align else None
        hidden = model.decode(embeds, inputs[2], self.cache, kv_len, capture)
        logits = model.logits(hidden)
        partner = self._partner[:n].clamp(max=n - 1)
        slots = torch.arange(n, device=logits.device)
        return self._sample_slots(logits, logits[partner], slots, inputs[1])

    def _sample_slots(
        self, cond: Tensor, uncond: Tensor, slots: Tensor, steps: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Sample one token for each of ``slots`` with its own parameters and seed.

        The tokens are marked in the slots' repetition-penalty sets.

        Returns:
            The tokens [S] and the guided logits [S, V].
        """
        tokens, guided = t3_sampling.sample(
            cond, uncond, self._seen[slots], self._params[:, slots], self._seeds[slots], steps
        )
        # A device-side value: a Python ``True`` would be copied from the host, which CUDA
        # graph capture forbids.
        self._seen.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.bool))
        return tokens, guided

    def capture_graphs(self) -> None:
        """Capture the decode step (see :meth:`SlotDecoder.capture_graphs`) and prefill passes."""
        super().capture_graphs()
        self._capture_prefill_graphs()

    def _capture_prefill_graphs(
        self, max_rows: int = PREFILL_GRAPH_MAX_ROWS, max_len: int = PREFILL_GRAPH_MAX_LEN
    ) -> None:
        """Capture prefill passes for rows (powers of two) x prompt lengths (multiples of 64).

        A prefill of a burst of requests is otherwise ~600 eager kernel launches from Python,
        which under load wait for the GIL behind the S3Gen threads and the event loop
        (benchmarks/NOTES.md). Padding rows write only the scratch slot; padded positions of
        real rows lie beyond their length, where decoding overwrites them.
        """
        pool = torch.cuda.graph_pool_handle()
        rows_sizes, rows = [], 1
        while rows < min(max_rows, self.n_slots):
            rows_sizes.append(rows)
            rows *= 2
        rows_sizes.append(min(max_rows, self.n_slots))
        top = min(max_len, self.max_seq_len)
        lengths = list(range(PREFILL_LEN_BUCKET, top + 1, PREFILL_LEN_BUCKET))
        for rows in reversed(rows_sizes):
            for length in reversed(lengths):
                self._prefill_graphs[rows, length] = _PrefillGraph(self, rows, length, pool)
        logger.info(f"Captured T3 prefill CUDA graphs for rows {rows_sizes} x lengths {lengths}")

    def _prefill_graph_for(self, rows: int, length: int) -> _PrefillGraph | None:
        """The smallest captured prefill graph with at least ``rows`` rows and ``length``."""
        fitting = [k for k in self._prefill_graphs if k[0] >= rows and k[1] >= length]
        return self._prefill_graphs[min(fitting)] if fitting else None

    def drop_graphs(self) -> None:
        """Forget captured graphs (decode and prefill eagerly)."""
        super().drop_graphs()
        self._prefill_graphs.clear()

    def remove(self, request_id: str) -> None:
        """Drop a request and free its slots (no-op for unknown ids)."""
        state = self._active.pop(request_id, None)
        if state is not None:
            self._free.extend(state.slots)

    def _assign(self, request: T3Request, slots: list[int]) -> None:
        """Write a new request's sampling parameters, seed and partner into its slots."""
        head = slots[0]
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        values = [float(getattr(request, name)) for name in t3_sampling.PARAMS]
        values[0] = request.cfg_weight if len(slots) == 2 else 0.0
        params = torch.tensor(values, device=self.model.device)
        for slot in slots:
            self._params[:, slot] = params
            self._seeds[slot] = seed
            self._partner[slot] = slots[-1] if slot == head else slot
            self._seen[slot] = False
        self._params[0, slots[-1]] = 0.0  # the unconditional row itself is unguided
        self._seen[head, START_SPEECH_TOKEN] = True

    def _conditioning(self, request: T3Request) -> Tensor:
        conds = request.conditionals
        speaker = _field(conds, "speaker_emb")
        if speaker is None:
            raise ValueError("conditionals have no speaker_emb")
        prompt = _field(conds, "cond_prompt_speech_tokens")
        key = float(request.exaggeration)
        return self._conds.get(speaker, key, lambda: self.model.conditioning(speaker, prompt, key))

    def _advance(
        self,
        states: list[_Active],
        picked: list[int],
        guided: Tensor,
        alignment: list[np.ndarray | None],
    ) -> list[StepOutput]:
        """Record each request's sampled token; finished requests leave."""
        outputs = []
        for i, (state, token) in enumerate(zip(states, picked, strict=True)):
            state.generated += 1
            state.last_token = token
            finished = token == STOP_SPEECH_TOKEN or state.generated >= state.budget
            logits = guided[i].clone() if self.record_logits else None
            outputs.append(
                StepOutput(state.request.request_id, token, finished, logits, alignment[i])
            )
            if finished:
                self.remove(state.request.request_id)
        return outputs


class _PrefillGraph:
    """One captured prefill pass for fixed rows and a padded prompt length."""

    def __init__(self, decoder: T3BatchDecoder, rows: int, length: int, pool: Any):
        model = decoder.model
        device = model.device
        self._embeds = torch.zeros(
            rows, length, model.config.hidden_size, device=device, dtype=model.dtype
        )
        self._slots = torch.full((rows,), decoder._scratch_slot, dtype=torch.long, device=device)
        self._lengths = torch.ones(rows, dtype=torch.long, device=device)
        self._scratch = decoder._scratch_slot
        cache = decoder.cache
        align = decoder._align  # recorded whenever the decoder aligns (see T3BatchDecoder)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                model.prefill(self._embeds, cache, self._slots, self._lengths, align)
        torch.cuda.current_stream(device).wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph, pool=pool):
            self._hidden = model.prefill(self._embeds, cache, self._slots, self._lengths, align)

    def run(self, embeds: Tensor, slots: Tensor, lengths: Tensor) -> Tensor:
        """Replay for ``embeds`` [b, n, D] (b, n within the graph's): hidden states [b, D]."""
        b, n, _ = embeds.shape
        self._embeds.zero_()
        self._embeds[:b, :n] = embeds
        self._slots.fill_(self._scratch)
        self._slots[:b] = slots
        self._lengths.fill_(1)
        self._lengths[:b] = lengths
        self._graph.replay()
        return self._hidden[:b]


class TorchT3Backend(T3Backend):
    """T3 in our own PyTorch code, all active requests decoded together in a background thread.

    Args:
        model_dir: Folder with ``t3_cfg.safetensors`` and ``tokenizer.json``.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: Model dtype (``torch.dtype`` or ``"float32"``/``"bfloat16"``/``"float16"``);
            None picks bfloat16 on CUDA, float32 on CPU.
        max_batch_size: Requests decoded at once; more wait for a free place.
        max_seq_len: Longest prompt plus speech sequence (KV-cache length per slot).
        cuda_graphs: Replay the decode step as CUDA graphs (None: on CUDA devices). Falls back
            to eager decoding if capture fails.
        kv_bucket: Cache-length step of the decode graphs (see :class:`T3BatchDecoder`).
        prefill_batch: Most waiting requests prefilled together in one pass.
        alignment: Stream alignment rows to requests that ask (word timestamps); False also
            skips capturing the decode graphs that record them.
    """

    #: T3 weights file in ``model_dir`` (a subclass serves another model's).
    t3_file = "t3_cfg.safetensors"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        max_batch_size: int = 8,
        max_seq_len: int = 1536,
        cuda_graphs: bool | None = None,
        kv_bucket: int = 256,
        prefill_batch: int = 16,
        alignment: bool = True,
    ):
        self.model_dir = Path(model_dir)
        self.alignment = alignment
        self.kv_bucket = kv_bucket
        self.prefill_batch = prefill_batch
        self.device = device
        self.dtype = resolve_dtype(dtype, device)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        is_cuda = torch.device(device).type == "cuda"
        self.cuda_graphs = is_cuda if cuda_graphs is None else cuda_graphs
        self.decoder: T3BatchDecoder | None = None
        self._cv = threading.Condition()
        self._inbox: deque[_Job] = deque()
        self._jobs: dict[str, _Job] = {}  # every request not yet finished, by id
        self._cancelled: set[str] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        """Load the weights and start the decode thread."""
        self.decoder = await asyncio.to_thread(self._load)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="t3-decode", daemon=True)
        self._thread.start()

    def _load(self) -> SlotDecoder:
        decoder = self._build_decoder()
        if self.cuda_graphs:
            try:
                with torch.inference_mode():
                    decoder.capture_graphs()
            except Exception as exc:  # noqa: BLE001 - eager decoding still works
                logger.warning(f"CUDA graph capture failed, decoding eagerly: {exc}")
                decoder.drop_graphs()
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)  # the decode thread uses its own stream
        logger.info(
            f"{type(self).__name__} ready: {self.max_batch_size} requests x {self.max_seq_len} "
            f"tokens, KV cache {decoder.cache.nbytes / 2**20:.0f} MiB"
        )
        return decoder

    def _build_decoder(self) -> SlotDecoder:
        """Load the weights and tokenizer into this backend's decoder."""
        model = T3Model.from_safetensors(
            self.model_dir / self.t3_file,
            device=self.device,
            dtype=self.dtype,
            max_positions=self.max_seq_len,
        )
        tokenizer = self._load_tokenizer()
        return T3BatchDecoder(
            model,
            tokenizer,
            max_batch_size=self.max_batch_size,
            max_seq_len=self.max_seq_len,
            kv_bucket=self.kv_bucket,
            alignment=self.alignment,
        )

    def _load_tokenizer(self) -> T3Tokenizer:
        """Returns: the text tokenizer (the English ``tokenizer.json``)."""
        return T3Tokenizer(self.model_dir / "tokenizer.json")

    @property
    def word_alignment(self) -> bool:
        """Whether requests with ``alignment`` get alignment rows (see :class:`T3Backend`)."""
        return bool(getattr(self.decoder, "aligns", False))

    def time_step(
        self, requests: int, kv_len: int = 512, repeats: int = 5, align: bool = False
    ) -> float | None:
        """Seconds one decode step takes for ``requests`` requests (CUDA graphs only).

        Replays the captured graph on zero inputs, as capturing did; only while no request
        is active (the engine calls it at start, for its capacity calibration).

        Args:
            requests: Requests decoded together.
            kv_len: Keys attended over.
            repeats: Timed replays (after one untimed).
            align: Time the graph that records the alignment heads.

        Returns:
            The median step time, or None without graphs or while requests run.
        """
        decoder = self.decoder
        if decoder is None or not decoder.graph_keys or decoder.active_ids:
            return None
        rows = decoder.decode_rows(requests)
        graph = decoder._graph_for(rows, kv_len, align)
        if graph is None:
            return None
        device = decoder.model.device
        inputs = torch.zeros(3, rows, dtype=torch.long, device=device)
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 1):
                started = time.perf_counter()
                graph.run(inputs)
                torch.cuda.synchronize(device)
                times.append(time.perf_counter() - started)
        return sorted(times[1:])[len(times[1:]) // 2]

    def generate(self, request: T3Request) -> TokenStream:
        """Queue ``request``; its tokens stream out as they are sampled (see T3Backend)."""
        if self._thread is None or self._stopping:
            raise RuntimeError("TorchT3Backend is not started")
        aligned = request.alignment and self.word_alignment
        text_tokens = self.decoder.text_tokens(request.text, request.language) if aligned else None
        stream = TokenStream(lambda: self._cancel(request.request_id), text_tokens)
        job = _Job(request, stream)
        with self._cv:
            if request.request_id in self._jobs:
                raise ValueError(f"request {request.request_id!r} is already running")
            self._jobs[request.request_id] = job
            self._inbox.append(job)
            self._cv.notify()
        return stream

    def _cancel(self, request_id: str) -> None:
        with self._cv:
            job = self._jobs.pop(request_id, None)
            if job is None:
                return
            job.cancelled = True
            self._cancelled.add(request_id)
            self._cv.notify()

    async def close(self) -> None:
        """Stop the decode thread, end all open streams and free the model."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with self._cv:
            self._stopping = True
            self._cv.notify()
        await asyncio.to_thread(thread.join)
        error = RuntimeError("T3 backend closed")
        with self._cv:
            for job in self._jobs.values():
                job.stream.finish(error)
            self._jobs.clear()
            self._inbox.clear()
        self.decoder = None

    # ---- decode thread

    def _run(self) -> None:
        decoder = self.decoder
        assert decoder is not None
        device = decoder.model.device
        # Own CUDA stream, high priority: T3 steps do not queue behind S3Gen work, and the
        # GPU schedules their blocks ahead of a long S3Gen batch's.
        stream = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None
        on_stream = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with torch.inference_mode(), on_stream:
            while True:
                with self._cv:
                    while not (
                        self._stopping or self._inbox or self._cancelled or decoder.active_ids
                    ):
                        self._cv.wait()
                    if self._stopping:
                        return
                    cancelled, self._cancelled = self._cancelled, set()
                    admitted: list[_Job] = []
                    free = decoder.free_slots
                    while self._inbox:
                        job = self._inbox[0]
                        if job.cancelled:
                            self._inbox.popleft()
                            continue
                        if free < decoder.slots_needed(job.request):
                            break
                        free -= decoder.slots_needed(job.request)
                        admitted.append(self._inbox.popleft())
                for request_id in cancelled:
                    decoder.remove(request_id)
                live = [job for job in admitted if not job.cancelled]
                for start in range(0, len(live), self.prefill_batch):
                    self._admit(decoder, live[start : start + self.prefill_batch])
                if decoder.active_ids:
                    try:
                        outputs = decoder.step()
                    except Exception as exc:  # noqa: BLE001 - fail the requests, keep serving
                        logger.exception("T3 decode step failed")
                        for request_id in decoder.active_ids:
                            decoder.remove(request_id)
                            self._fail(request_id, exc)
                        continue
                    for out in outputs:
                        self._deliver(out)

    def _admit(self, decoder: T3BatchDecoder, jobs: list[_Job]) -> None:
        results = decoder.add_batch([job.request for job in jobs])
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, Exception):
                logger.warning(f"T3 request {job.request.request_id} failed: {result}")
                self._fail(job.request.request_id, result)
            else:
                self._deliver(result)

    def _deliver(self, out: StepOutput) -> None:
        with self._cv:
            job = self._jobs.get(out.request_id)
            if job is None or job.cancelled:
                return
            if out.finished:
                del self._jobs[out.request_id]
        if out.token < SPEECH_VOCAB_VALID:
            rows = [out.alignment] if out.alignment is not None else None
            job.stream.push([out.token], rows)
        if out.finished:
            job.stream.finish()

    def _fail(self, request_id: str, error: BaseException) -> None:
        with self._cv:
            job = self._jobs.pop(request_id, None)
        if job is not None:
            job.stream.finish(error)
