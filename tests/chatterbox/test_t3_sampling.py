"""Sampling: each filter against HF's definition, and upstream's order of application."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chatterbox_sidecar.engines.chatterbox.t3 import sampling as t3_sampling

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


def _draw(logits, greedy, seeds, steps):
    n = len(greedy)
    return t3_sampling.draw(
        logits,
        torch.tensor(greedy),
        torch.tensor(seeds, dtype=torch.long),
        torch.tensor(steps if isinstance(steps, list) else [steps] * n, dtype=torch.long),
    ).tolist()


def test_draw_greedy_and_seeded():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    assert _draw(logits, [True, True], [1, 2], 0) == [1, 0]
    # The same seed and step draw the same token; a row depends only on its own seed and step.
    a = _draw(logits, [False, False], [5, 6], 3)
    assert a == _draw(logits, [False, False], [5, 6], 3)
    assert _draw(logits[1:], [False], [6], 3) == a[1:]
    assert _draw(logits.flip(0), [False, False], [6, 5], 3) == a[::-1]
    # Seeds above 32 bits count in full.
    flat = torch.zeros(1, 1000)
    assert _draw(flat, [False], [7], 0) != _draw(flat, [False], [7 + (1 << 40)], 0)
    # -inf tokens are never drawn.
    masked = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    for seed in range(20):
        assert _draw(masked, [False], [seed], seed) == [0]


def test_draw_follows_the_distribution():
    # 4,000 rows with distinct seeds (and 4,000 steps of one seed) drawing from one
    # distribution: the frequencies match the probabilities within a few standard errors.
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    n = 4000
    logits = probs.log().expand(n, -1)
    greedy = torch.zeros(n, dtype=torch.bool)
    across_seeds = t3_sampling.draw(
        logits, greedy, torch.arange(n) * 7919 + 3, torch.zeros(n, dtype=torch.long)
    )
    across_steps = t3_sampling.draw(logits, greedy, torch.full((n,), 42), torch.arange(n))
    for picks in (across_seeds, across_steps):
        freq = torch.bincount(picks, minlength=5).double() / n
        sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
        assert ((freq - probs.double()).abs() <= 4 * sigma).all(), freq


def test_noise_is_uniform_and_independent_of_the_batch():
    seeds = torch.tensor([0, 1, 2**40 + 5, 2**62], dtype=torch.long)
    steps = torch.tensor([0, 0, 9, 1000], dtype=torch.long)
    noise = t3_sampling.uniform_noise(seeds, steps, 8194)
    assert ((noise > 0) & (noise < 1)).all()
    assert abs(noise.mean().item() - 0.5) < 0.01
    assert abs(noise.var().item() - 1 / 12) < 0.005
    # Neighbouring tokens and rows are not correlated.
    corr = torch.corrcoef(torch.stack([noise[:, :-1].reshape(-1), noise[:, 1:].reshape(-1)]))
    assert abs(corr[0, 1].item()) < 0.02
    alone = t3_sampling.uniform_noise(seeds[2:3], steps[2:3], 8194)
    assert torch.equal(alone[0], noise[2])


def test_unit_interval_never_reaches_zero_or_one():
    extremes = torch.tensor([0, 1, 511, 512, 2**31, 2**32 - 512, 2**32 - 1], dtype=torch.long)
    u = t3_sampling.unit_interval(extremes)
    assert ((u > 0) & (u < 1)).all(), u
    assert (-torch.log(u) > 0).all()


def test_draw_never_picks_an_impossible_token_whatever_the_noise(monkeypatch):
    # The worst noise there is (every value at the top of the interval): still only tokens
    # with probability above zero can win.
    top = t3_sampling.unit_interval(torch.tensor(2**32 - 1))
    monkeypatch.setattr(
        t3_sampling, "uniform_noise", lambda seeds, steps, v: torch.full((len(seeds), v), top)
    )
    logits = torch.full((2, 50), float("-inf"))
    logits[0, 7], logits[1, 30] = 0.0, 5.0
    assert _draw(logits, [False, False], [1, 2], 0) == [7, 30]


def test_sample_guides_filters_and_draws():
    # Guidance makes token 1 win; greedy rows take the argmax of the guided logits.
    cond = torch.tensor([[2.0, 1.9, 0.0]])
    uncond = torch.tensor([[2.0, 0.0, 0.0]])
    seen = torch.zeros(1, 3, dtype=torch.bool)
    params = torch.tensor([[1.0], [1.0], [0.0], [0.0], [1.0]])  # cfg 1, greedy
    tokens, guided = t3_sampling.sample(
        cond, uncond, seen, params, torch.tensor([1]), torch.tensor([0])
    )
    assert tokens.tolist() == [1]
    torch.testing.assert_close(guided, torch.tensor([[2.0, 3.8, 0.0]]))
