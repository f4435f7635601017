"""Random train/validation splits (the paper: five random 70/30 splits)."""

from __future__ import annotations

import numpy as np


def random_splits(n: int, k: int = 5, train_fraction: float = 0.7, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """k (train indices, validation indices) splits of range(n), deterministic from seed."""
    if n < 2 or k < 1 or not 0 < train_fraction < 1:
        raise ValueError(f"need n >= 2, k >= 1 and 0 < train_fraction < 1, got {n}, {k}, {train_fraction}")
    n_train = min(n - 1, max(1, round(train_fraction * n)))
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(k):
        order = rng.permutation(n)
        splits.append((sorted(order[:n_train].tolist()), sorted(order[n_train:].tolist())))
    return splits
