"""The hard Dice against a one-hot reference on fresh random label maps, and its edge cases."""

from __future__ import annotations

import math

import torch

from expseg_fast.metrics import hard_dice, nanstd


def one_hot_dice(pred: torch.Tensor, target: torch.Tensor, num_labels: int) -> list[float]:
    p = torch.nn.functional.one_hot(pred.reshape(-1), num_labels).double()
    g = torch.nn.functional.one_hot(target.reshape(-1), num_labels).double()
    inter, size = (p * g).sum(0), p.sum(0) + g.sum(0)
    return [2 * float(i) / float(s) if s > 0 else math.nan for i, s in zip(inter, size)]


def test_hard_dice_matches_one_hot_reference_on_random_maps():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    for _ in range(20):
        num_labels = int(torch.randint(2, 25, (), generator=gen))
        shape = tuple(int(s) for s in torch.randint(1, 9, (3,), generator=gen))
        target = torch.randint(0, num_labels, shape, generator=gen)
        noise = torch.randint(0, num_labels, shape, generator=gen)
        pred = torch.where(torch.rand(shape, generator=gen) < 0.7, target, noise)
        got = hard_dice(pred, target, num_labels)
        want = one_hot_dice(pred, target, num_labels)
        assert got.dtype == torch.float64 and got.shape == (num_labels,)
        for g, w in zip(got.tolist(), want):
            assert (math.isnan(g) and math.isnan(w)) or math.isclose(g, w, rel_tol=1e-12)


def test_hard_dice_edge_cases():
    pred = torch.tensor([0, 1, 1, 2, 2, 2])
    target = torch.tensor([0, 1, 2, 2, 2, 1])
    d = hard_dice(pred, target, 4)
    assert torch.allclose(d[:3].float(), torch.tensor([1.0, 0.5, 2 * 2 / 6]))
    assert torch.isnan(d[3])  # absent from both
    assert hard_dice(torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long), 2).tolist() == [0.0, 0.0]


def test_nanstd_ignores_nan():
    x = torch.tensor([[1.0, math.nan], [3.0, 2.0], [math.nan, 4.0]])
    assert torch.allclose(nanstd(x), torch.tensor([1.0, 1.0]))
