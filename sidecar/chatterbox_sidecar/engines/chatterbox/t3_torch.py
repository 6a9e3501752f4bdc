"""The ``torch`` T3 backend: our own T3 inference with batched decoding of all active requests.

Two layers:

- :class:`T3BatchDecoder` (synchronous, one thread): requests join with :meth:`~T3BatchDecoder.add`
  (prefill, first token), :meth:`~T3BatchDecoder.step` samples one more token for every active
  request in one backbone pass, finished requests leave by themselves and cancelled ones with
  :meth:`~T3BatchDecoder.remove`. Each request holds one KV-cache slot for its conditional row
  and, when guidance is on, one for its unconditional row, so both branches keep their context.
- :class:`TorchT3Backend`: runs the decoder in a background thread; requests and cancellations
  arrive through a locked inbox, tokens leave through :class:`~.t3_stream.TokenStream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import Tensor

from chatterbox_sidecar.engines.chatterbox import t3_sampling
from chatterbox_sidecar.engines.chatterbox.t3_backend import T3Backend, T3Request
from chatterbox_sidecar.engines.chatterbox.t3_model import (
    SPEECH_VOCAB_VALID,
    START_SPEECH_TOKEN,
    STOP_SPEECH_TOKEN,
    T3KVCache,
    T3Model,
)
from chatterbox_sidecar.engines.chatterbox.t3_stream import TokenStream
from chatterbox_sidecar.engines.chatterbox.t3_text import T3Tokenizer

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


@dataclass
class StepOutput:
    """One sampled token of one request.

    Parameters:
        request_id: The request.
        token: The sampled id (may be >= 6561; only smaller ids are speech).
        finished: True when this was the stop token or the budget's last token.
        logits: The guided logits the token was sampled from (before penalties), when the
            decoder records them.
    """

    request_id: str
    token: int
    finished: bool
    logits: Tensor | None = None


@dataclass
class _Active:
    request: T3Request
    slots: list[int]  # [conditional] or [conditional, unconditional]
    position: int  # sequence position of the next fed token (= keys in the cache)
    budget: int
    generator: torch.Generator
    generated: int = 0
    last_token: int = START_SPEECH_TOKEN
    finished: bool = False


@dataclass
class _Job:
    request: T3Request
    stream: TokenStream
    cancelled: bool = field(default=False)


class T3BatchDecoder:
    """Batched T3 decoding over a fixed pool of KV-cache slots.

    Args:
        model: The loaded model.
        tokenizer: The text tokenizer.
        max_batch_size: Requests decoded at once (each takes two cache slots with guidance).
        max_seq_len: Longest prompt plus speech sequence a slot holds.
        record_logits: Attach the guided logits to each :class:`StepOutput` (for tests).
    """

    def __init__(
        self,
        model: T3Model,
        tokenizer: T3Tokenizer,
        *,
        max_batch_size: int = 8,
        max_seq_len: int = 1536,
        record_logits: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.record_logits = record_logits
        self._graphs: dict[int, _DecodeGraph] = {}
        n_slots = 2 * max_batch_size
        self.cache = T3KVCache(model.config, n_slots, max_seq_len, model.device, model.dtype)
        self._seen = torch.zeros(
            n_slots, model.config.speech_vocab_size, dtype=torch.bool, device=model.device
        )
        self._free = list(range(n_slots))
        self._active: dict[str, _Active] = {}

    @property
    def active_ids(self) -> list[str]:
        """Ids of the requests being decoded."""
        return list(self._active)

    @property
    def free_slots(self) -> int:
        """KV-cache slots not held by a request."""
        return len(self._free)

    def slots_needed(self, request: T3Request) -> int:
        """Cache slots ``request`` takes (two with guidance, one without)."""
        return 2 if request.cfg_weight != 0 else 1

    def can_admit(self, request: T3Request) -> bool:
        """Whether enough slots are free for ``request``."""
        return len(self._free) >= self.slots_needed(request)

    def add(self, request: T3Request) -> StepOutput:
        """Prefill ``request`` and sample its first token.

        Raises:
            ValueError: Duplicate id, no free slots, or a prompt longer than a slot.
        """
        if request.request_id in self._active:
            raise ValueError(f"request {request.request_id!r} is already running")
        if not self.can_admit(request):
            raise ValueError("no free KV-cache slots")
        model = self.model
        text_ids = torch.tensor(self.tokenizer.encode(request.text), dtype=torch.long)
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
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=model.device).manual_seed(seed)
        state = _Active(request, slots, length, max(budget, 1), generator)
        self._active[request.request_id] = state
        self._seen[slots[0]] = False
        self._seen[slots[0], START_SPEECH_TOKEN] = True
        try:
            slot_t = torch.tensor(slots, device=model.device)
            hidden = model.prefill(torch.stack(rows), self.cache, slot_t)
            logits = model.logits(hidden)
            uncond = logits[1:2] if len(rows) == 2 else logits[0:1]
            return self._sample([state], logits[0:1], uncond)[0]
        except BaseException:
            self.remove(request.request_id)
            raise

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
        device = self.model.device
        inputs = torch.tensor([tokens, speech_pos, positions], device=device)
        bucket = next((b for b in sorted(self._graphs) if b >= rows), None)
        if bucket is not None:
            logits = self._graphs[bucket].run(inputs)
        else:
            embeds = self.model.speech_embeds(inputs[0], inputs[1])
            hidden = self.model.decode(embeds, inputs[2], self.cache, kv_len)
            logits = self.model.logits(hidden)
        for s in states:
            s.position += 1
        cond = logits[[s.slots[0] for s in states]]
        uncond = logits[[s.slots[-1] for s in states]]
        return self._sample(states, cond, uncond)

    def capture_graphs(self) -> None:
        """Capture the decode step as CUDA graphs, one per power-of-two row count.

        Must run while no request is active: capturing runs the step on every slot (writing
        position 0 of each), which is harmless only while all slots are free. Afterwards
        :meth:`step` replays the smallest graph with enough rows; graphs attend over the whole
        cache (masked), so one graph serves every sequence length.
        """
        if self.model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if self._active:
            raise RuntimeError("capture CUDA graphs before any request starts")
        pool = torch.cuda.graph_pool_handle()
        rows, n_slots = 1, self.cache.n_slots
        sizes = []
        while rows < n_slots:
            sizes.append(rows)
            rows *= 2
        sizes.append(n_slots)
        for rows in reversed(sizes):  # largest first, so smaller ones reuse its pool memory
            self._graphs[rows] = _DecodeGraph(self.model, self.cache, rows, pool)
        logger.info(f"Captured T3 decode CUDA graphs for {sizes} rows")

    def drop_graphs(self) -> None:
        """Forget captured graphs (decode eagerly)."""
        self._graphs.clear()

    def remove(self, request_id: str) -> None:
        """Drop a request and free its slots (no-op for unknown ids)."""
        state = self._active.pop(request_id, None)
        if state is not None:
            self._free.extend(state.slots)

    def _conditioning(self, request: T3Request) -> Tensor:
        conds = request.conditionals
        speaker = _field(conds, "speaker_emb")
        if speaker is None:
            raise ValueError("conditionals have no speaker_emb")
        prompt = _field(conds, "cond_prompt_speech_tokens")
        return self.model.conditioning(speaker, prompt, request.exaggeration)

    def _sample(self, states: list[_Active], cond: Tensor, uncond: Tensor) -> list[StepOutput]:
        device = cond.device
        reqs = [s.request for s in states]

        def per_row(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        cfg = per_row(
            [r.cfg_weight if len(s.slots) == 2 else 0.0 for r, s in zip(reqs, states, strict=True)]
        )
        guided = t3_sampling.guide(cond, uncond, cfg)
        seen_rows = torch.tensor([s.slots[0] for s in states], device=device)
        processed = t3_sampling.process_logits(
            guided,
            self._seen[seen_rows],
            penalty=per_row([r.repetition_penalty for r in reqs]),
            temperature=per_row([r.temperature for r in reqs]),
            min_p=per_row([r.min_p for r in reqs]),
            top_p=per_row([r.top_p for r in reqs]),
        )
        picked = t3_sampling.draw(
            processed, [r.temperature <= 0 for r in reqs], [s.generator for s in states]
        )
        self._seen[seen_rows, torch.tensor(picked, device=device)] = True
        outputs = []
        for i, (state, token) in enumerate(zip(states, picked, strict=True)):
            state.generated += 1
            state.last_token = token
            finished = token == STOP_SPEECH_TOKEN or state.generated >= state.budget
            logits = guided[i].clone() if self.record_logits else None
            outputs.append(StepOutput(state.request.request_id, token, finished, logits))
            if finished:
                self.remove(state.request.request_id)
        return outputs


class _DecodeGraph:
    """One captured decode step for a fixed number of rows (inputs padded with zeros)."""

    def __init__(self, model: T3Model, cache: T3KVCache, rows: int, pool: Any):
        self._model, self._cache = model, cache
        self._inputs = torch.zeros(3, rows, dtype=torch.long, device=model.device)
        stream = torch.cuda.Stream(model.device)
        stream.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream(model.device).wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph, pool=pool):
            self._logits = self._forward()

    def _forward(self) -> Tensor:
        tokens, speech_pos, positions = self._inputs
        embeds = self._model.speech_embeds(tokens, speech_pos)
        hidden = self._model.decode(embeds, positions, self._cache, self._cache.max_len)
        return self._model.logits(hidden)

    def run(self, inputs: Tensor) -> Tensor:
        """Replay for ``inputs`` [3, n] (tokens, speech positions, positions); n <= rows."""
        n = inputs.shape[1]
        self._inputs.zero_()
        self._inputs[:, :n] = inputs
        self._graph.replay()
        return self._logits[:n]


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
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        max_batch_size: int = 8,
        max_seq_len: int = 1536,
        cuda_graphs: bool | None = None,
    ):
        self.model_dir = Path(model_dir)
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

    def _load(self) -> T3BatchDecoder:
        model = T3Model.from_safetensors(
            self.model_dir / "t3_cfg.safetensors",
            device=self.device,
            dtype=self.dtype,
            max_positions=self.max_seq_len,
        )
        tokenizer = T3Tokenizer(self.model_dir / "tokenizer.json")
        decoder = T3BatchDecoder(
            model, tokenizer, max_batch_size=self.max_batch_size, max_seq_len=self.max_seq_len
        )
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
            f"T3 torch backend ready: {self.max_batch_size} requests x {self.max_seq_len} "
            f"tokens, KV cache {decoder.cache.nbytes / 2**20:.0f} MiB"
        )
        return decoder

    def generate(self, request: T3Request) -> TokenStream:
        """Queue ``request``; its tokens stream out as they are sampled (see T3Backend)."""
        if self._thread is None or self._stopping:
            raise RuntimeError("TorchT3Backend is not started")
        stream = TokenStream(on_close=lambda: self._cancel(request.request_id))
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
        # Own CUDA stream: T3 steps do not queue behind S3Gen work on the default stream.
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
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
                for job in admitted:
                    self._admit(decoder, job)
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

    def _admit(self, decoder: T3BatchDecoder, job: _Job) -> None:
        if job.cancelled:
            return
        try:
            out = decoder.add(job.request)
        except Exception as exc:  # noqa: BLE001 - reported to the request's consumer
            logger.warning(f"T3 request {job.request.request_id} failed: {exc}")
            self._fail(job.request.request_id, exc)
            return
        self._deliver(out)

    def _deliver(self, out: StepOutput) -> None:
        with self._cv:
            job = self._jobs.get(out.request_id)
            if job is None or job.cancelled:
                return
            if out.finished:
                del self._jobs[out.request_id]
        if out.token < SPEECH_VOCAB_VALID:
            job.stream.push([out.token])
        if out.finished:
            job.stream.finish()

    def _fail(self, request_id: str, error: BaseException) -> None:
        with self._cv:
            job = self._jobs.pop(request_id, None)
        if job is not None:
            job.stream.finish(error)
