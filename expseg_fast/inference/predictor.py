"""Inference: a predictor for one fixed input shape.

Eval mode, the chosen precision (autocast; normalisation statistics stay float32), channels-last. On
CUDA the forward is captured in a CUDA graph on first use (static input and output buffers, warm-up on
a side stream) and replayed afterwards; on the CPU it runs eagerly. Options: BatchNorm folded into the
convolutions (fold_bn, exact in float32: expseg_fast/models/folding.py) and a compiled graph (compiled:
torch.compile fuses the pointwise ops; on CUDA with its own CUDA graphs instead of ours). The predictor
works on its own copy of the model: the caller's model keeps its mode, memory format and weights, and
later changes to it do not reach the predictor (build a new one).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from expseg_fast.config import DTYPES, PREDICTOR
from expseg_fast.models.folding import fold_batchnorm
from expseg_fast.models.forward import logits_at

Precision = Literal["fp32", "bf16", "fp16"]


def class_softmax(logits: torch.Tensor) -> torch.Tensor:
    """The softmax over classes (N, C, D, H, W) float32 of logits of that shape, in their layout. Channels-last
    logits go through PyTorch's kernel for the innermost axis, which their classes are (7.5 ms for
    (1, 18, 64^3) on the 2-core CPU, against 20 ms for the softmax over dim 1 of the same memory)."""
    logits = logits.float()
    if logits.dim() == 5 and not logits.is_contiguous() and logits.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.softmax(logits.permute(0, 2, 3, 4, 1), dim=-1).permute(0, 4, 1, 2, 3)
    return torch.softmax(logits, dim=1)


class Predictor:
    """predictor(image) -> labels (N, D, H, W) int64; predictor.predict(image, probabilities=True)
    also returns the softmax (N, C, D, H, W) float32. `image` must have exactly `input_shape`."""

    def __init__(
        self,
        model: nn.Module,
        input_shape: tuple[int, int, int, int, int],
        precision: Precision = PREDICTOR.precision,  # type: ignore[assignment]
        channels_last: bool = PREDICTOR.channels_last,
        cuda_graph: bool = PREDICTOR.cuda_graph,
        fold_bn: bool = PREDICTOR.fold_bn,
        compiled: bool = PREDICTOR.compiled,
    ) -> None:
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {tuple(DTYPES)}, got {precision!r}")
        if len(input_shape) != 5:
            raise ValueError(f"input_shape must be (N, C, D, H, W), got {tuple(input_shape)}")
        self.model = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
        self.device = next(model.parameters()).device
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dtype = DTYPES[precision]
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last_3d)
        self.use_graph = cuda_graph and self.device.type == "cuda" and not compiled
        if compiled:  # inductor fuses the pointwise ops; on CUDA its own CUDA graphs ("reduce-overhead")
            mode = "reduce-overhead" if cuda_graph and self.device.type == "cuda" else "default"
            self.model = torch.compile(self.model, mode=mode, dynamic=False)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_input: torch.Tensor | None = None
        self._static_logits: torch.Tensor | None = None

    def _forward(self, image: torch.Tensor) -> torch.Tensor:
        return logits_at(self.model, image, self.dtype)

    def _capture(self) -> None:
        self._static_input = torch.zeros(self.input_shape, device=self.device).to(memory_format=self.memory_format)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._forward(self._static_input)
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_logits = self._forward(self._static_input)

    @torch.inference_mode()
    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Raw network output (N, C, D, H, W) for `image` of input_shape. With a CUDA graph this is the
        graph's output buffer, overwritten by the next call: clone it to keep it."""
        if tuple(image.shape) != self.input_shape:
            raise ValueError(f"image must have the predictor's shape {self.input_shape}, got {tuple(image.shape)}")
        image = image.to(self.device, torch.float32)
        if not self.use_graph:
            return self._forward(image.contiguous(memory_format=self.memory_format))
        if self._graph is None:
            self._capture()
        self._static_input.copy_(image)
        self._graph.replay()
        return self._static_logits

    @torch.inference_mode()
    def predict(self, image: torch.Tensor, probabilities: bool = False):
        """labels (N, D, H, W), and the softmax (N, C, D, H, W) float32 when probabilities is True."""
        logits = self.logits(image)
        labels = logits.argmax(dim=1)
        if probabilities:
            return labels, class_softmax(logits)
        return labels

    @torch.inference_mode()
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """The softmax (N, C, D, H, W) float32 only (what sliding windows blend: no arg max per window)."""
        return class_softmax(self.logits(image))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.predict(image)
