"""Random train/validation splits (the paper: five random 70/30 splits)."""

from __future__ import annotations

from expseg_fast.data.splits import random_splits


def test_random_splits_are_deterministic_disjoint_70_30():
    splits = random_splits(43, k=5, seed=1)
    assert splits == random_splits(43, k=5, seed=1) and splits != random_splits(43, k=5, seed=2)
    for train, val in splits:
        assert len(train) == 30 and len(val) == 13 and not set(train) & set(val)
        assert sorted(train + val) == list(range(43))
