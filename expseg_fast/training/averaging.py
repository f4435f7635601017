"""An exponential moving average of the weights (TrainConfig.ema_decay): a copy of the network whose
floating-point weights and buffers follow the trained ones after every step, which the epoch's
validation, best.pt and inference use. Each step it moves by 1 - d of the way to the trained weights, with
d = min(ema_decay, (1 + n) / (10 + n)) at its n-th update (timm's warm-up: early on it averages about the
last tenth of the steps, so it never lags the start of training by much; it averages about 1 / (1 - d)
steps once n is large). Integer buffers (BatchNorm's step count) are copied."""

from __future__ import annotations

import copy

import torch


def decay_at(ema_decay: float, updates: int) -> float:
    """The share of the average kept at its `updates`-th update (1-based)."""
    return min(ema_decay, (1 + updates) / (10 + updates))


class WeightAverage:
    """model: the averaged copy (eval mode, no gradients) of the trained network it was made from, which it
    follows; updates: how many steps it has followed."""

    def __init__(self, trained: torch.nn.Module, ema_decay: float) -> None:
        if not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        self.ema_decay = ema_decay
        self.model = copy.deepcopy(trained).eval().requires_grad_(False)
        self.updates = 0
        # the two networks' tensors paired by name once (loading a state dict copies in place, so they stay
        # the networks'): floating ones are averaged, integer ones (BatchNorm's step count) copied
        pairs = list(zip(self.model.state_dict().values(), trained.state_dict().values(), strict=True))
        self._averaged = [a for a, _ in pairs if a.is_floating_point()]
        self._trained = [t for a, t in pairs if a.is_floating_point()]
        self._counters = [(a, t) for a, t in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Moves the average towards the trained network's weights (after a step)."""
        self.updates += 1
        if self._averaged:
            torch._foreach_lerp_(self._averaged, self._trained, 1 - decay_at(self.ema_decay, self.updates))
        for a, t in self._counters:
            a.copy_(t)

    def state(self) -> dict:
        """What a checkpoint keeps of it besides its weights."""
        return {"average_updates": self.updates}

    def restore(self, weights: dict, state: dict) -> None:
        """Puts it back as a checkpoint saved it (weights: its state dict)."""
        self.model.load_state_dict(weights)
        self.updates = int(state["average_updates"])
