"""Upstream Chatterbox's speech-token sampling, vectorised over requests.

Order per step (as upstream ``T3.inference``): classifier-free guidance combine, repetition
penalty, temperature, min-p, top-p, then a multinomial draw. Each row carries its own
parameters and random generator, so a request samples the same tokens alone or in a batch.
A temperature of 0 (or below) means greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def draw(
    logits: Tensor, greedy: Sequence[bool], generators: Sequence[torch.Generator]
) -> list[int]:
    """Pick one token per row: argmax for greedy rows, else a draw with the row's generator.

    Args:
        logits: Filtered logits [B, V].
        greedy: Whether each row is greedy.
        generators: Each row's random generator (on the logits' device).

    Returns:
        The chosen token ids.
    """
    probs = torch.softmax(logits, dim=-1)
    argmax = probs.argmax(dim=-1)
    picks: list[Tensor] = []
    for i, (is_greedy, gen) in enumerate(zip(greedy, generators, strict=True)):
        if is_greedy:
            picks.append(argmax[i : i + 1])
        else:
            picks.append(torch.multinomial(probs[i : i + 1], 1, generator=gen)[0])
    return torch.cat(picks).tolist() if picks else []
