"""One optimizer step on one subject, in one of three forms (TrainConfig.step_mode):

- `eager`: forward under autocast, the fused loss, backward, NAdam; a step whose loss or gradients are
  not finite is stopped before the optimizer can spoil the weights (fp16 leaves that to its grad scaler).
- `compiled`: the same with the network under torch.compile (inductor fuses BatchNorm, ReLU and the
  residual adds of forward and backward; the fused loss is a registered op, so the graph does not break).
- `cuda_graph` (CUDA): the WHOLE step — forward, the fused loss (its label weights are constants of the
  run), backward, the finiteness check and the optimizer (capturable NAdam) — captured once in one CUDA
  graph on static input buffers (static shapes, batch 1) and replayed (the learning rate a device tensor
  that the schedule sets in place); the subject is copied into the buffers after the augmentation. Inside
  the graph, non-finite gradients are zeroed before the optimizer step; one device read per step brings
  back the loss and the check, and the run stops on it.
The first step runs eagerly (it creates the optimizer's state); the capture's warm-up steps then run on
the second subject and are undone (weights, BatchNorm statistics and optimizer state restored in place),
so the replayed steps start where eager would (the noise and dropout draws of the warm-up are not).
"""

from __future__ import annotations

import torch

from expseg_fast.config import STEP_MODES
from expseg_fast.data.preprocess import IGNORE
from expseg_fast.losses import LossSpec
from expseg_fast.losses import loss as loss_fn

_WARMUP = 3  # eager steps on a side stream before the capture (kernels chosen, allocator warm)


class TrainStep:
    """step(image, labels) -> (loss, finite): one step; when not finite the weights were not changed
    (eager, compiled) or changed by momentum only (cuda_graph), and the caller stops the run."""

    def __init__(self, model: torch.nn.Module, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, weights: torch.Tensor, spec: LossSpec, dtype: torch.dtype,
                 memory_format: torch.memory_format, mode: str = "eager") -> None:
        if mode not in STEP_MODES:
            raise ValueError(f"step mode must be one of {', '.join(STEP_MODES)}, got {mode!r}")
        self.model, self.optimizer, self.scaler, self.weights, self.spec = model, optimizer, scaler, weights, spec
        self.dtype, self.memory_format, self.mode = dtype, memory_format, mode
        self.net = torch.compile(net) if mode == "compiled" else net
        self._graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, image: torch.Tensor, labels: torch.Tensor) -> tuple[float, bool]:
        if self.mode == "cuda_graph" and self.optimizer.state:
            return self._replay(image, labels)
        self.optimizer.zero_grad(set_to_none=True)
        value = self._loss(image, labels)
        self.scaler.scale(value).backward()
        if not self.scaler.is_enabled():  # fp16: the scaler skips steps with non-finite gradients itself
            value = value.detach()
            if not bool(torch.isfinite(value) & torch.isfinite(self._grad_norm())):
                return float(value), False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(value.detach()), True

    def set_lr(self, value: float) -> None:
        """The optimizer's learning rate from the next step on (in place where it is a tensor: a captured
        graph reads it from the device)."""
        for group in self.optimizer.param_groups:
            rate, device = group["lr"], group["params"][0].device
            if torch.is_tensor(rate) and rate.device == device:
                rate.fill_(value)
            elif torch.is_tensor(rate):  # a resumed run's, loaded to the CPU; the graph is captured after this
                group["lr"] = torch.tensor(value, device=device)
            else:
                group["lr"] = value

    def _loss(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(image.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                            cache_enabled=self.mode != "cuda_graph"):  # a cast cache would outlive the capture
            logits = self.net(image.contiguous(memory_format=self.memory_format))
        # a stray label other than IGNORE is an error; a non-finite loss is left to the divergence check
        return loss_fn(logits, labels, self.weights, self.spec, validate="labels", ignore_index=IGNORE)

    def _grad_norm(self) -> torch.Tensor:
        return torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])

    def _graphed_body(self) -> torch.Tensor:
        """The captured step on the static buffers: (loss, finite) as one float tensor."""
        torch._foreach_zero_([p.grad for p in self.model.parameters() if p.grad is not None])
        value = self._loss(self._image, self._labels)
        value.backward()
        finite = torch.isfinite(value.detach()) & torch.isfinite(self._grad_norm())
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.copy_(torch.where(finite, p.grad, torch.zeros_like(p.grad)))
        self.optimizer.step()
        return torch.stack([value.detach().float(), finite.float()])

    def _capture(self, image: torch.Tensor, labels: torch.Tensor) -> None:
        self._image = image.detach().clone().contiguous(memory_format=self.memory_format)
        self._labels = labels.detach().clone()
        saved = _snapshot(self.model, self.optimizer)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARMUP):
                self._graphed_body()
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._result = self._graphed_body()
        _restore(saved)

    def _replay(self, image: torch.Tensor, labels: torch.Tensor) -> tuple[float, bool]:
        if self._graph is None:
            self._capture(image, labels)
        self._image.copy_(image)
        self._labels.copy_(labels)
        self._graph.replay()
        value, finite = self._result.tolist()  # the one device read of the step
        return value, bool(finite)


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, its copy) of every weight, buffer and optimizer state tensor, to be restored in place."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return [(t, t.detach().clone()) for t in tensors]


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for tensor, copy in saved:
            tensor.copy_(copy)
