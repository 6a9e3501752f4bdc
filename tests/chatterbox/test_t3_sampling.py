"""Sampling: each filter against HF's definition, and upstream's order of application."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chatterbox_sidecar.engines.chatterbox import t3_sampling

pytestmark = pytest.mark.torch


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


# Straightforward one-row references of HF's processors, as upstream uses them.
def ref_penalty(logits, seen_ids, penalty):
    out = logits.copy()
    for i in set(seen_ids):
        out[i] = out[i] * penalty if out[i] < 0 else out[i] / penalty
    return out


def ref_min_p(logits, min_p):
    probs = softmax(logits)
    out = logits.copy()
    out[probs < min_p * probs.max()] = -np.inf
    return out


def ref_top_p(logits, top_p):
    order = np.argsort(logits, kind="stable")  # ascending
    cum = np.cumsum(softmax(logits[order]))
    out = logits.copy()
    for rank, idx in enumerate(order[:-1]):
        if cum[rank] <= 1 - top_p:
            out[idx] = -np.inf
    return out


def ref_pipeline(cond, uncond, w, seen_ids, penalty, temperature, min_p, top_p):
    x = cond + w * (cond - uncond)
    x = ref_penalty(x, seen_ids, penalty)
    x = x / temperature
    x = ref_min_p(x, min_p)
    return ref_top_p(x, top_p)


def run_ours(cond, uncond, w, seen_ids, penalty, temperature, min_p, top_p):
    vocab = cond.shape[0]
    seen = torch.zeros(1, vocab, dtype=torch.bool)
    seen[0, list(seen_ids)] = True

    def row(v):
        return torch.tensor([v], dtype=torch.float64)

    guided = t3_sampling.guide(torch.tensor(cond)[None], torch.tensor(uncond)[None], row(w))
    out = t3_sampling.process_logits(
        guided,
        seen,
        penalty=row(penalty),
        temperature=row(temperature),
        min_p=row(min_p),
        top_p=row(top_p),
    )
    return out[0].numpy()


@pytest.mark.parametrize(
    "w,penalty,temperature,min_p,top_p",
    [(0.5, 1.2, 0.8, 0.05, 1.0), (0.0, 2.0, 1.3, 0.1, 0.9), (1.0, 1.0, 0.5, 0.0, 0.5)],
)
def test_pipeline_matches_reference(w, penalty, temperature, min_p, top_p):
    rng = np.random.default_rng(0)
    cond, uncond = rng.normal(0, 2, 300), rng.normal(0, 2, 300)
    seen = rng.integers(0, 300, 40).tolist()
    ours = run_ours(cond, uncond, w, seen, penalty, temperature, min_p, top_p)
    ref = ref_pipeline(cond, uncond, w, seen, penalty, temperature, min_p, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-12)


def test_order_guidance_penalty_temperature_min_p():
    # Token 0 leads, token 1 trails by 2. With min_p 0.2: at temperature 2 token 1 survives
    # (exp(-1) > 0.2), at temperature 1 it would not (exp(-2) < 0.2). So min_p must see
    # tempered logits.
    cond = np.array([4.0, 2.0, -20.0])
    ours = run_ours(cond, cond, 0.0, [], 1.0, 2.0, 0.2, 1.0)
    assert np.isfinite(ours[:2]).all() and not np.isfinite(ours[2])
    # The penalty divides seen positive logits and multiplies seen negative ones.
    pen = run_ours(np.array([3.0, -1.0, 0.0]), np.zeros(3), 0.0, [0, 1], 1.5, 0.5, 0.0, 1.0)
    np.testing.assert_allclose(pen, [3.0 / 1.5 / 0.5, -1.0 * 1.5 / 0.5, 0.0])
    # Guidance comes first: the penalty sees guided logits (sign flips change the branch).
    cond, uncond = np.array([1.0, 0.0]), np.array([3.0, 0.0])  # guided: 1 + 1*(1-3) = -1
    guided_then_penalty = run_ours(cond, uncond, 1.0, [0], 2.0, 1.0, 0.0, 1.0)
    assert guided_then_penalty[0] == pytest.approx(-2.0)  # -1 * 2, not (1 / 2) guided


def test_draw_greedy_and_seeded():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    assert t3_sampling.draw(logits, [True, True], gens) == [1, 0]
    a = t3_sampling.draw(
        logits.repeat(1, 1),
        [False, False],
        [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)],
    )
    b = t3_sampling.draw(
        logits, [False, False], [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    )
    assert a == b
    # A row's draw depends only on its own generator, not on the rows beside it.
    alone = t3_sampling.draw(logits[1:], [False], [torch.Generator().manual_seed(6)])
    assert alone == b[1:]
    # -inf tokens are never drawn.
    masked = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    for seed in range(20):
        assert t3_sampling.draw(masked, [False], [torch.Generator().manual_seed(seed)]) == [0]
