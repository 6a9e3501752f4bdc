"""Inference-only speed-ups for S3Gen on CUDA: CUDA-graph replay, folded weight norm, bf16 flow.

S3Gen is launch-bound on a GPU: one 10-step chunk issues about 11,000 small kernels, so the CPU
that enqueues them, not the GPU, sets the pace. :class:`GraphCache` records a function once per
input shape as a CUDA graph and afterwards replays it with one launch. The S3Gen decoder pads its
inputs to a few bucketed shapes (more rows, more masked frames at the end) so that a handful of
graphs serve every chunk.

Everything here is exact in fp32 up to rounding; :func:`bf16_estimator` is the one lossy option
(its error against fp32 is measured in ``benchmarks/gpu_bench.py``).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn


def fold_weight_norm(module: nn.Module) -> int:
    """Replace every weight-norm parametrization under ``module`` by its current weight.

    Upstream's HiFT and F0 predictor wrap their convolutions in ``weight_norm``, which
    recomputes each weight from ``g`` and ``v`` (three kernels) on every call. For inference the
    product is a constant.

    Args:
        module: The model (changed in place).

    Returns:
        How many parametrizations were folded.
    """
    from torch.nn.utils import parametrize

    folded = 0
    for sub in module.modules():
        if parametrize.is_parametrized(sub, "weight"):
            parametrize.remove_parametrizations(sub, "weight", leave_parametrized=True)
            folded += 1
    return folded


def _chunk_mask_without_sync(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Upstream's ``add_optional_chunk_mask`` without its host synchronisation.

    Upstream checks ``(...).sum().item()`` for rows whose mask is all False (and then, with
    ``logging`` never imported, fails). The estimator calls it 14 times a step: 14 waits for the
    GPU, and no CUDA graph can be recorded across them. Without chunking (how S3Gen calls it)
    the result is the mask with all-False rows set to True; this computes exactly that on the
    device. Other calls go to the original.
    """

    def add_optional_chunk_mask(
        xs: torch.Tensor,
        masks: torch.Tensor,
        use_dynamic_chunk: bool,
        use_dynamic_left_chunk: bool,
        decoding_chunk_size: int,
        static_chunk_size: int,
        num_decoding_left_chunks: int,
        enable_full_context: bool = True,
    ) -> torch.Tensor:
        if use_dynamic_chunk or static_chunk_size > 0:
            return original(
                xs,
                masks,
                use_dynamic_chunk,
                use_dynamic_left_chunk,
                decoding_chunk_size,
                static_chunk_size,
                num_decoding_left_chunks,
                enable_full_context,
            )
        return masks | ~masks.any(dim=-1, keepdim=True)

    add_optional_chunk_mask.sync_free = True  # type: ignore[attr-defined]
    return add_optional_chunk_mask


def patch_sync_free_masks() -> None:
    """Make S3Gen's flow decoder and encoder build their masks without host syncs (idempotent)."""
    from chatterbox_vllm.models.s3gen import decoder
    from chatterbox_vllm.models.s3gen.transformer import upsample_encoder

    for module in (decoder, upsample_encoder):
        current = module.add_optional_chunk_mask
        if not getattr(current, "sync_free", False):
            module.add_optional_chunk_mask = _chunk_mask_without_sync(current)


def istft_without_sync(
    magnitude: torch.Tensor, phase: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor
) -> torch.Tensor:
    """``torch.istft`` (centered, one-sided) by inverse FFT and overlap-add, with no host sync.

    ``torch.istft`` checks its window envelope with ``.item()``, which a CUDA graph cannot
    record. Same arithmetic otherwise: frames times window, overlap-added, divided by the
    summed squared window, ``n_fft // 2`` trimmed at both ends.

    Args:
        magnitude: Shape (B, n_fft // 2 + 1, T).
        phase: Same shape, radians.
        n_fft: FFT size.
        hop: Hop length.
        window: Shape (n_fft,).

    Returns:
        Shape (B, hop * (T - 1)).
    """
    spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
    frames = torch.fft.irfft(spec, n=n_fft, dim=1) * window[None, :, None]  # (B, n_fft, T)
    t = frames.shape[2]
    length = n_fft + hop * (t - 1)
    fold = dict(output_size=(1, length), kernel_size=(1, n_fft), stride=(1, hop))
    signal = F.fold(frames, **fold)[:, 0, 0]
    envelope = F.fold((window**2)[None, :, None].expand(1, n_fft, t), **fold)[:, 0, 0]
    half = n_fft // 2
    return signal[:, half : length - half] / envelope[:, half : length - half]


def graphable_hift(hift: nn.Module) -> None:
    """Give a HiFT generator an ``_istft`` that CUDA graphs can record (idempotent)."""
    if getattr(hift, "_istft_sync_free", False):
        return
    n_fft, hop = hift.istft_params["n_fft"], hift.istft_params["hop_len"]
    # A plain attribute, left on the CPU by ``.to(device)``: copied to the GPU on every call.
    hift.stft_window = hift.stft_window.to(next(hift.parameters()).device)

    def _istft(magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        magnitude = torch.clip(magnitude, max=1e2)
        window = hift.stft_window.to(magnitude.dtype)
        return istft_without_sync(magnitude, phase, n_fft, hop, window)

    hift._istft = _istft
    hift._istft_sync_free = True


class _CastInput(nn.Module):
    """Run ``inner`` on its input cast to ``dtype`` (the time MLP of a bf16 estimator)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype))


def bf16_estimator(estimator: nn.Module) -> nn.Module:
    """A bfloat16 copy of the flow estimator that still embeds the time step in float32.

    The sinusoidal time embedding multiplies ``t`` by 1000, so ``t`` itself must stay float32
    (bf16 would move it by up to 4 radians); only the MLP after it runs in bf16.

    Args:
        estimator: Upstream's ``ConditionalDecoder``.

    Returns:
        The copy (the original is untouched). Call it with ``t`` in float32 and every other
        input in bfloat16.
    """
    est = copy.deepcopy(estimator).to(torch.bfloat16)
    est.time_mlp = _CastInput(est.time_mlp, torch.bfloat16)
    return est


class GraphCache:
    """Replay functions as CUDA graphs, one graph per (name, input shapes and dtypes).

    A key runs eagerly the first ``min_uses - 1`` times it is seen (one-off shapes, such as
    an utterance's last chunk, are never recorded); at the next call the function runs once
    more eagerly on the capture stream (warm-up), is recorded, and from then on each call
    copies the inputs into the recorded buffers and replays. All graphs share one memory pool,
    which is safe because they are replayed one at a time from one thread. The returned tensors
    are the graph's own output buffers: read them before the next call with the same key.

    Recording here skips what ``torch.cuda.graph`` does around a capture (garbage collection
    and ``empty_cache``): mid-service, both stall every stream for tens of milliseconds.

    When ``enabled`` is False (CPU) or a capture fails, the function simply runs.

    Args:
        enabled: Whether to capture at all.
        max_graphs: Graphs kept; the least recently used one is dropped beyond this.
        min_uses: Calls with a key before it is recorded.
    """

    def __init__(self, enabled: bool, max_graphs: int = 2048, min_uses: int = 2):
        self.enabled = enabled
        self.max_graphs = max_graphs
        self.min_uses = min_uses
        self._graphs: OrderedDict[tuple, tuple[Any, list[torch.Tensor], Any]] = OrderedDict()
        self._seen: dict[tuple, int] = {}
        self._failed: set[str] = set()
        self._pool = torch.cuda.graph_pool_handle() if enabled else None
        self._stream = torch.cuda.Stream() if enabled else None
        self.captures = 0
        self.eager_calls = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, name: str, fn: Callable[..., Any], *inputs: torch.Tensor) -> Any:
        """Run ``fn(*inputs)``, through a graph when possible.

        Args:
            name: Identifies ``fn`` (part of the key).
            fn: A function of tensors only, without CPU synchronisation or data-dependent shapes.
            *inputs: Its tensor arguments.

        Returns:
            What ``fn`` returns (the graph's static outputs when replayed).
        """
        if not self.enabled or name in self._failed:
            return fn(*inputs)
        key = (name, *((tuple(t.shape), t.dtype) for t in inputs))
        entry = self._graphs.get(key)
        if entry is None:
            seen = self._seen.get(key, 0) + 1
            if seen < self.min_uses:
                self._seen[key] = seen
                self.eager_calls += 1
                return fn(*inputs)
            self._seen.pop(key, None)
            try:
                entry = self._capture(fn, inputs)
            except Exception as e:  # noqa: BLE001 - the eager path still works
                logger.warning(f"CUDA graph capture of {name} failed, running it eagerly: {e}")
                self._failed.add(name)
                torch.cuda.synchronize()
                return fn(*inputs)
            self._graphs[key] = entry
            self.captures += 1
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, static, out = entry
        for buffer, value in zip(static, inputs, strict=True):
            buffer.copy_(value)
        graph.replay()
        return out

    def _capture(self, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> tuple:
        static = [t.clone() for t in inputs]
        side = self._stream
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            fn(*static)  # warm-up: lazy initialisation and kernel selection happen outside
            side.synchronize()
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                out = fn(*static)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        return graph, static, out


def bucket(n: int, step: int) -> int:
    """Returns: ``n`` rounded up to a multiple of ``step``."""
    return -(-n // step) * step


def pow2_bucket(n: int) -> int:
    """Returns: the smallest power of two >= ``n``."""
    return 1 << max(0, n - 1).bit_length()
