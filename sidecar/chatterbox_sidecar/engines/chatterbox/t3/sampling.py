"""Upstream Chatterbox's speech-token sampling, vectorised over requests.

Order per step (as upstream ``T3.inference``): classifier-free guidance combine, repetition
penalty, temperature, min-p, top-p, then a random draw. Each row carries its own parameters,
seed and step, so a request samples the same tokens alone or in a batch. A temperature of 0
(or below) means greedy decoding.

The draw uses no stateful random generator: a row's noise is a hash of (seed, step, token),
so one decode step samples every row with a fixed set of kernels, no host synchronisation and
nothing per row, which a CUDA graph can record. (``torch.multinomial`` with one
``torch.Generator`` per request costs a few launches per row and cannot be graphed.)
"""

from __future__ import annotations

import torch
from torch import Tensor


def guide(cond: Tensor, uncond: Tensor, cfg_weight: Tensor) -> Tensor:
    """Classifier-free guidance: ``cond + w * (cond - uncond)`` per row.

    Args:
        cond: Conditional logits [B, V].
        uncond: Unconditional logits [B, V] (rows without guidance may repeat ``cond``).
        cfg_weight: Guidance weights [B].

    Returns:
        Guided logits [B, V].
    """
    return cond + cfg_weight[:, None] * (cond - uncond)


def repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """Penalise tokens already in the sequence (negative logits multiplied, others divided).

    Args:
        logits: Logits [B, V].
        seen: True where the token already occurred [B, V].
        penalty: Penalty per row [B] (1 is none).

    Returns:
        Penalised logits.
    """
    p = penalty[:, None]
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def min_p_filter(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below ``min_p`` times the most likely one's."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def top_p_filter(logits: Tensor, top_p: Tensor) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``top_p``.

    As HF's warper: tokens are sorted by ascending logit and those whose cumulative probability
    stays at or below ``1 - top_p`` are dropped; the most likely token always stays.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)[:, None]
    drop_sorted[:, -1] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: Tensor,
    seen: Tensor,
    *,
    penalty: Tensor,
    temperature: Tensor,
    min_p: Tensor,
    top_p: Tensor,
) -> Tensor:
    """Apply repetition penalty, temperature, min-p and top-p, in upstream's order.

    Args:
        logits: Guided logits [B, V] (float32).
        seen: Tokens already in each sequence [B, V].
        penalty: Repetition penalty per row [B].
        temperature: Temperature per row [B]; rows at 0 or below are left unscaled (greedy).
        min_p: Min-p per row [B].
        top_p: Top-p per row [B].

    Returns:
        Filtered logits [B, V]; removed tokens are ``-inf``.
    """
    logits = repetition_penalty(logits, seen, penalty)
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    logits = logits / scale[:, None]
    logits = min_p_filter(logits, min_p)
    return top_p_filter(logits, top_p)


_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of int64 values in ``[0, 2**32)``.

    Both multipliers are below ``2**31``, so every product stays below ``2**63``: exact in
    int64 on every device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def uniform_noise(seeds: Tensor, steps: Tensor, vocab_size: int) -> Tensor:
    """Counter-based uniform noise in ``(0, 1)``, one value per (row, token).

    Args:
        seeds: Non-negative int64 seed of each row [B].
        steps: Int64 step of each row [B] (its count of sampled tokens).
        vocab_size: Tokens per row.

    Returns:
        Float32 [B, vocab_size]; row ``i`` depends only on ``seeds[i]`` and ``steps[i]``.
    """
    key = _mix32(seeds & _MASK32)
    key = _mix32(key ^ ((seeds >> 32) & _MASK32))
    key = _mix32(key ^ (steps & _MASK32))
    tokens = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    return unit_interval(_mix32(key[:, None] ^ ((tokens * 0x9E3779B1) & _MASK32)[None, :]))


def unit_interval(bits: Tensor) -> Tensor:
    """Map 32-bit integers (int64 in ``[0, 2**32)``) to float32 strictly inside ``(0, 1)``.

    23 bits and a half-step offset: the largest value, ``1 - 2**-24``, is exact in float32
    (with 24 bits it would round up to 1.0, and ``-log(1) = 0`` would break the draw).
    """
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def draw(logits: Tensor, greedy: Tensor, seeds: Tensor, steps: Tensor) -> Tensor:
    """Pick one token per row: argmax for greedy rows, else a draw from ``softmax(logits)``.

    The draw is the exponential race (Gumbel-max in another form): with ``E`` independent
    standard exponentials, ``argmax(p / E)`` is distributed as ``p``. ``-inf`` tokens have
    ``p = 0`` and are never drawn.

    Args:
        logits: Filtered logits [B, V].
        greedy: Whether each row is greedy [B] (bool).
        seeds: Each row's seed [B] (int64, non-negative).
        steps: Each row's step [B] (int64): a new step gives new noise.

    Returns:
        The chosen token ids [B] (int64, on the logits' device).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    exponential = -torch.log(uniform_noise(seeds, steps, logits.shape[-1]))
    # Zero-probability tokens score -1 outright, so no rounding can ever let them win.
    raced = torch.where(probs > 0, probs / exponential, -1.0).argmax(dim=-1)
    return torch.where(greedy, probs.argmax(dim=-1), raced)


def sample(
    cond: Tensor,
    uncond: Tensor,
    seen: Tensor,
    params: Tensor,
    seeds: Tensor,
    steps: Tensor,
) -> tuple[Tensor, Tensor]:
    """A whole sampling step for a batch: guidance, filters and the draw.

    Args:
        cond: Conditional logits [B, V] (float32).
        uncond: Unconditional logits [B, V] (rows without guidance may repeat ``cond``).
        seen: Tokens already in each sequence [B, V].
        params: Float32 [5, B]: guidance weight, repetition penalty, temperature, min-p,
            top-p (see :data:`PARAMS`).
        seeds: Int64 seed of each row [B].
        steps: Int64 step of each row [B].

    Returns:
        The tokens [B] (int64) and the guided logits before penalties [B, V].
    """
    cfg, penalty, temperature, min_p, top_p = params
    guided = guide(cond, uncond, cfg)
    processed = process_logits(
        guided, seen, penalty=penalty, temperature=temperature, min_p=min_p, top_p=top_p
    )
    return draw(processed, temperature <= 0, seeds, steps), guided


PARAMS = ("cfg_weight", "repetition_penalty", "temperature", "min_p", "top_p")
"""The rows of :func:`sample`'s ``params``, named as :class:`~.t3_backend.T3Request` fields."""
