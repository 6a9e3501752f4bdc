"""What every batched T3 decoder shares: requests in KV-cache slots, graphed decode steps.

The Original's :class:`~.torch_backend.T3BatchDecoder` (two slots a guided request) and
Turbo's :class:`~..turbo.t3_backend.TurboT3BatchDecoder` (one slot) build on
:class:`SlotDecoder`, which the ``torch`` backend's decode thread drives. A subclass sets the
attributes :class:`SlotDecoder` lists and implements ``_admit``, ``_prefill`` and
``decode_and_sample``.

A decoder that records the alignment heads' attention for word timestamps (``aligns``) gets a
second set of decode graphs, captured with the recording, and replays those only for steps
where some request asked: steps where none did run the graphs without it and cost nothing more.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch
from loguru import logger
from torch import Tensor

from chatterbox_sidecar.engines.chatterbox.t3.backend import T3Request

Output = TypeVar("Output")


class ConditioningCache:
    """A voice's conditioning rows, kept while its speaker tensor lives.

    Keyed by the tensor's identity (a ``WeakKeyDictionary`` would compare tensors with ``==``
    on a hash match), then by a per-request key (the Original's exaggeration).

    Args:
        max_keys: Most keys kept per voice (a client sweeping values starts the voice over).
    """

    def __init__(self, max_keys: int = 8):
        self._max_keys = max_keys
        self._voices: dict[int, tuple[weakref.ref, dict[Hashable, Tensor]]] = {}

    def get(self, speaker: Any, key: Hashable, compute: Callable[[], Tensor]) -> Tensor:
        """The rows of ``speaker`` for ``key``, computed by ``compute`` the first time."""
        entry = self._voices.get(id(speaker))
        if entry is None or entry[0]() is not speaker:
            voice_id = id(speaker)
            try:
                ref = weakref.ref(speaker, lambda _: self._voices.pop(voice_id, None))
            except TypeError:  # cannot be weakly referenced: no caching
                return compute()
            entry = self._voices[voice_id] = (ref, {})
        rows = entry[1]
        if key not in rows:
            if len(rows) >= self._max_keys:
                rows.clear()
            rows[key] = compute()
        return rows[key]


class DecodeGraph(Generic[Output]):
    """One captured decode step for fixed rows and attended cache length (inputs zero-padded).

    Records ``decoder.decode_and_sample(inputs, kv_len)`` (with ``align=True`` for an aligned
    graph, which also writes the decoder's alignment buffer); its output is a tensor or a
    tuple of tensors, one row per slot.
    """

    def __init__(
        self, decoder: SlotDecoder, rows: int, kv_len: int, pool: Any, align: bool = False
    ):
        device = decoder.model.device
        self._inputs = torch.zeros(3, rows, dtype=torch.long, device=device)
        options = {"align": True} if align else {}
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                decoder.decode_and_sample(self._inputs, kv_len, **options)
        torch.cuda.current_stream(device).wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph, pool=pool):
            self._outputs = decoder.decode_and_sample(self._inputs, kv_len, **options)

    def run(self, inputs: Tensor) -> Output:
        """Replay for ``inputs`` [3, n], n <= rows: the outputs' first ``n`` rows."""
        n = inputs.shape[1]
        self._inputs.zero_()
        self._inputs[:, :n] = inputs
        self._graph.replay()
        if isinstance(self._outputs, tuple):
            return tuple(out[:n] for out in self._outputs)  # type: ignore[return-value]
        return self._outputs[:n]


class SlotDecoder:
    """Request bookkeeping and decode graphs over a fixed pool of KV-cache slots.

    A subclass sets ``model`` (with a ``device``), ``n_slots`` (slots decode steps run over),
    ``max_seq_len``, ``kv_bucket``, ``_active`` (request id -> state), ``_free`` (free slot
    numbers) and ``_graphs`` (an empty dict), and implements ``_admit(request) -> (state,
    payload)``, ``_prefill([(state, payload), ...]) -> outputs``, ``decode_and_sample`` and
    ``remove``. One that records alignment sets ``aligns`` and takes ``align`` in
    ``decode_and_sample``.
    """

    model: Any
    n_slots: int
    max_seq_len: int
    kv_bucket: int
    _active: dict[str, Any]
    _free: list[int]
    _graphs: dict[tuple[int, int], DecodeGraph]
    #: Whether ``decode_and_sample`` can record the alignment heads (``align=True``).
    aligns: bool = False

    @property
    def active_ids(self) -> list[str]:
        """Ids of the requests being decoded."""
        return list(self._active)

    @property
    def free_slots(self) -> int:
        """KV-cache slots not held by a request."""
        return len(self._free)

    @property
    def graph_keys(self) -> list[tuple[int, int]]:
        """(rows, attended cache length) of each captured decode graph."""
        return sorted(self._graphs)

    @property
    def aligned_graph_keys(self) -> list[tuple[int, int]]:
        """(rows, attended cache length) of each captured decode graph that records alignment."""
        return sorted(self._aligned_graphs)

    @property
    def _aligned_graphs(self) -> dict[tuple[int, int], DecodeGraph]:
        """The decode graphs that record alignment (made here: subclasses set ``_graphs``)."""
        return self.__dict__.setdefault("_aligned_graphs_", {})

    def slots_needed(self, request: T3Request) -> int:
        """Cache slots ``request`` takes."""
        return 1

    def decode_rows(self, requests: int) -> int:
        """Rows a decode step of ``requests`` requests runs over."""
        return min(requests, self.n_slots)

    def can_admit(self, request: T3Request) -> bool:
        """Whether enough slots are free for ``request``."""
        return len(self._free) >= self.slots_needed(request)

    def add(self, request: T3Request) -> Any:
        """Prefill ``request`` and sample its first token.

        Raises:
            ValueError: Duplicate id, no free slots, or a prompt longer than a slot.
        """
        result = self.add_batch([request])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def add_batch(self, requests: list[T3Request]) -> list[Any]:
        """Prefill several requests in one right-padded pass and sample their first tokens.

        Each request samples exactly as if added alone.

        Args:
            requests: The new requests.

        Returns:
            Per request, its first output, or the error that kept it out (duplicate id, no
            free slots, a prompt longer than a slot); the others still run.
        """
        results: list[Any] = [None] * len(requests)
        admitted: list[tuple[int, Any, Any]] = []
        for i, request in enumerate(requests):
            try:
                admitted.append((i, *self._admit(request)))
            except Exception as exc:  # noqa: BLE001 - returned to the caller for this request
                results[i] = exc
        if admitted:
            try:
                outputs = self._prefill([(state, payload) for _, state, payload in admitted])
            except Exception as exc:  # noqa: BLE001 - every request of the pass failed
                for i, state, _ in admitted:
                    self.remove(state.request.request_id)
                    results[i] = exc
            else:
                for (i, _, _), out in zip(admitted, outputs, strict=True):
                    results[i] = out
        return results

    def capture_graphs(self) -> None:
        """Capture the decode step as CUDA graphs for every (row, cache length) bucket.

        Rows are powers of two up to the slot count, cache lengths multiples of
        ``kv_bucket`` up to ``max_seq_len``. Must run while no request is active: capturing
        runs the step on every slot (writing position 0 of each and their penalty sets),
        which is harmless only while all slots are free.
        """
        if self.model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if self._active:
            raise RuntimeError("capture CUDA graphs before any request starts")
        pool = torch.cuda.graph_pool_handle()
        sizes, rows = [], 1
        while rows < self.n_slots:
            sizes.append(rows)
            rows *= 2
        sizes.append(self.n_slots)
        lengths = list(range(self.kv_bucket, self.max_seq_len, self.kv_bucket))
        lengths.append(self.max_seq_len)
        variants = [(False, self._graphs)] + ([(True, self._aligned_graphs)] if self.aligns else [])
        # Largest first, so that smaller ones reuse its pool memory.
        for align, graphs in variants:
            for rows in reversed(sizes):
                for kv_len in reversed(lengths):
                    graphs[rows, kv_len] = DecodeGraph(self, rows, kv_len, pool, align)
        logger.info(
            f"{type(self).__name__}: captured decode CUDA graphs for rows {sizes} x cache "
            f"lengths {lengths}{' (and again recording alignment)' if self.aligns else ''}"
        )

    def drop_graphs(self) -> None:
        """Forget captured graphs (decode eagerly)."""
        self._graphs.clear()
        self._aligned_graphs.clear()

    def _graph_for(self, rows: int, kv_len: int, align: bool = False) -> DecodeGraph | None:
        """The smallest captured graph with at least ``rows`` rows and ``kv_len`` keys.

        Args:
            rows: Rows the step runs over.
            kv_len: Keys it attends over.
            align: Pick among the graphs that record the alignment heads.
        """
        graphs = self._aligned_graphs if align else self._graphs
        fitting = [key for key in graphs if key[0] >= rows and key[1] >= kv_len]
        return graphs[min(fitting)] if fitting else None

    # ---- for subclasses

    def _admit(self, request: T3Request) -> tuple[Any, Any]:
        raise NotImplementedError

    def _prefill(self, batch: list[tuple[Any, Any]]) -> list[Any]:
        raise NotImplementedError

    def decode_and_sample(self, inputs: Tensor, kv_len: int) -> Any:
        """The device work of one step for the first ``R`` slots (what a graph records).

        A decoder with ``aligns`` also takes ``align: bool``.
        """
        raise NotImplementedError

    def remove(self, request_id: str) -> None:
        """Drop a request and free its slots (no-op for unknown ids)."""
        raise NotImplementedError


__all__ = ["ConditioningCache", "DecodeGraph", "SlotDecoder"]
