"""Public loss API: the paper's Table 1 losses as functions and nn.Modules over several backends.

logits: (N, C, D, H, W), float32/bfloat16/float16 (float64 too), contiguous or channels_last_3d,
read in place. target: (N, D, H, W), integer labels in [0, C). Returns a float32 scalar (float64
for float64 logits); the
gradient has the logits' dtype and memory format.

Backends: "reference" (plain PyTorch autograd), "native" (the csrc op: C++/OpenMP on the CPU, CUDA
kernels on the GPU), "triton" (fused Triton kernels: CUDA, or the CPU under TRITON_INTERPRET=1 for
tests), "auto" (the fastest available for the logits' device).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn

from expseg_fast.kernels import triton_available
from expseg_fast.losses import native
from expseg_fast.losses.reference import reference_loss
from expseg_fast.losses.spec import PAPER_EPS, PAPER_GAMMA, PAPER_W_CROSS, PAPER_W_DICE, LossSpec
from expseg_fast.losses.statistics import label_statistics

Backend = Literal["auto", "reference", "native", "triton"]
BACKENDS = ("reference", "native", "triton")
# Fastest first, per device type, as measured (bench/NOTES.md): on an H100 the native CUDA op beats
# the Triton kernels in both layouts so far; Triton on the CPU is the interpreter: last. Under
# torch.use_deterministic_algorithms(True) the native CUDA op refuses to run (its statistics are
# accumulated atomically), so "auto" takes Triton, whose reduction order is then fixed.
_PREFERENCE = {"cuda": ("native", "triton", "reference"), "cpu": ("native", "reference", "triton")}
_DETERMINISTIC_PREFERENCE = {"cuda": ("triton", "reference"), "cpu": _PREFERENCE["cpu"]}


def preference(device_type: str, deterministic: bool) -> tuple[str, ...]:
    """The backends "auto" considers on a device type, fastest first."""
    table = _DETERMINISTIC_PREFERENCE if deterministic else _PREFERENCE
    return table.get(device_type, ("reference",))


def _available(name: str, device: torch.device) -> bool:
    if name == "native":
        return native.available(device)
    if name == "triton":
        return triton_available(device)
    return True


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on this device, fastest first (deterministic ones only, in deterministic mode)."""
    device = torch.device(device)
    order = preference(device.type, torch.are_deterministic_algorithms_enabled())
    return [name for name in order if _available(name, device)]


def check_backend_name(backend: str) -> None:
    """ValueError unless backend is "auto" or one of BACKENDS."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run: `backend` itself, or the fastest available for "auto"."""
    check_backend_name(backend)
    if backend == "auto":
        return available_backends(device)[0]
    if backend == "native" and not native.available(device):
        raise RuntimeError(f"backend 'native' is not available on {device.type}: {native.unavailable_reason(device)}")
    if backend == "triton" and not triton_available(device):
        raise RuntimeError(
            f"backend 'triton' is not available on {device.type}: it needs triton and a CUDA device "
            "(or TRITON_INTERPRET=1 on the CPU)"
        )
    return backend


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() != 5:
        raise ValueError(f"logits must be (N, C, D, H, W), got shape {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"logits must have at least 2 labels (dim 1), got {logits.shape[1]}")
    if (not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex()
            or target.dtype == torch.bool):
        raise ValueError(f"target must hold integer labels, got {getattr(target, 'dtype', type(target))}")
    n, _, d, h, w = logits.shape
    if tuple(target.shape) != (n, d, h, w):
        raise ValueError(f"target must be (N, D, H, W) = {(n, d, h, w)} to match logits, got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if weights is not None:
        if weights.shape != (logits.shape[1],):
            raise ValueError(f"weights must be (C,) = ({logits.shape[1]},), got {tuple(weights.shape)}")
        if weights.device != logits.device:
            raise ValueError(f"weights are on {weights.device} but logits are on {logits.device}")


def _raise_for_bad_values(bad_target: int, bad_logits: int, num_labels: int, ignore_index: int | None) -> None:
    if bad_target:
        other = "" if ignore_index is None else f" other than ignore_index {ignore_index}"
        raise ValueError(f"target: {bad_target} voxels hold labels outside [0, {num_labels}){other}")
    if bad_logits:
        raise ValueError(f"logits: {bad_logits} voxels hold NaN or Inf")


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream (nothing may be read back then)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _Checked(NamedTuple):
    target: torch.Tensor  # ignore_index moved out of [0, C) where it was a class index
    weights: torch.Tensor  # (C,), detached; ones when none were given
    validate: bool  # whether to read the counts of bad values back (not under compile or a graph capture)
    logits_too: bool  # whether non-finite logits raise (validate=True) or only bad labels ("labels")
    ignored: int  # voxels labelled ignore_index (counted only when validating)


def _checked(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, validate: bool | str,
             ignore_index: int | None) -> _Checked:
    """The shape, dtype and device checks of `loss` and `statistics`, and what their value checks need."""
    _check_inputs(logits, target, weights)
    num_labels = logits.shape[1]
    if weights is None:
        weights = torch.ones(num_labels, device=logits.device, dtype=torch.float32)
    weights = weights.detach()
    logits_too = validate is True
    validate = bool(validate) and not torch.compiler.is_compiling() and not _capturing(logits.device)
    if validate and (not bool(torch.isfinite(weights).all()) or bool((weights < 0).any())):
        raise ValueError("weights must be finite and >= 0")
    ignored = int((target == ignore_index).sum()) if validate and ignore_index is not None else 0
    if ignore_index is not None and 0 <= ignore_index < num_labels:  # a class index: moved out of range
        target = target.long().masked_fill(target == ignore_index, -1)
    return _Checked(target, weights, validate, logits_too, ignored)


def _raise_for_bad(checked: _Checked, logits: torch.Tensor, bad: torch.Tensor | None, ignore_index: int | None) -> None:
    """ValueError for bad labels (and non-finite logits) from the op's counts `bad`, or counted here (None)."""
    if not checked.validate:
        return
    num_labels = logits.shape[1]
    if bad is None:
        bad_target = int(((checked.target < 0) | (checked.target >= num_labels)).sum())
        bad_logits = int((~torch.isfinite(logits)).any(dim=1).sum()) if checked.logits_too else 0
    else:
        bad_target, bad_logits = bad.tolist()
    _raise_for_bad_values(bad_target - checked.ignored, bad_logits if checked.logits_too else 0, num_labels,
                          ignore_index)


def loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None,
    spec: LossSpec,
    backend: Backend = "auto",
    validate: bool | Literal["labels"] = True,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """The loss `spec` of logits against target; the functions below are its named cases.

    ignore_index: voxels labelled so contribute nothing (to the Dice statistics and the cross term) and
    get a zero gradient; the cross term's mean stays over all N*D*H*W voxels.
    validate: raise ValueError for labels outside [0, C) other than ignore_index, non-finite logits and
    negative or non-finite weights. It reads small tensors back from the device (a synchronisation on
    CUDA) and is skipped under torch.compile and while a CUDA graph is captured. validate="labels":
    the labels and weights only (a non-finite logit gives a non-finite loss, which a trainer takes for
    divergence). With validate=False,
    every out-of-range label is ignored as ignore_index is, silently, and the fused backends (native,
    triton) make the loss NaN for any non-finite logit (the reference follows IEEE arithmetic: NaN or
    +Inf give NaN).
    """
    checked = _checked(logits, target, weights, validate, ignore_index)
    target, weights = checked.target, checked.weights
    name = resolve_backend(backend, logits.device)
    if name == "reference":
        _raise_for_bad(checked, logits, None, ignore_index)
        return reference_loss(logits, target, weights, spec)
    if name == "triton":
        from expseg_fast.kernels.explog import explog as triton_explog

        value, bad = triton_explog(logits, target, weights, spec.op_args())
    else:
        if target.dtype not in native.LABEL_DTYPES:
            target = target.long()
        value, bad = native.explog(logits, target, weights, spec.op_args())
    _raise_for_bad(checked, logits, bad, ignore_index)
    return value


def statistics(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma_cross: float = 1.0,
    backend: Backend = "auto",
    validate: bool | Literal["labels"] = True,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """The per-(sample, label) statistics (N, C, 4) float64 (G, M, Q, T: losses/statistics.py), differentiable
    in M, Q and T, for losses built from them; checks as `loss`. Backends: native, reference ("auto": native
    where it runs, else the reference; the Triton kernels compute the loss only)."""
    checked = _checked(logits, target, None, validate, ignore_index)
    if backend == "auto":
        backend = "native" if native.available(logits.device) else "reference"
    if backend == "triton":
        raise ValueError("backend 'triton' computes the loss only; the label statistics run on 'native' or 'reference'")
    name = resolve_backend(backend, logits.device)
    stats, bad = label_statistics(logits, checked.target, gamma_cross, name)
    _raise_for_bad(checked, logits, bad, ignore_index)
    return stats


def exp_log_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    w_dice: float = PAPER_W_DICE,
    w_cross: float = PAPER_W_CROSS,
    gamma_dice: float = PAPER_GAMMA,
    gamma_cross: float = PAPER_GAMMA,
    eps: float = PAPER_EPS,
    backend: Backend = "auto",
    validate: bool = True,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """L_Exp = w_dice * L_Dice(gamma_dice) + w_cross * L_Cross(gamma_cross); paper's best by default."""
    spec = LossSpec.exp_log(w_dice, w_cross, gamma_dice, gamma_cross, eps)
    return loss(logits, target, weights, spec, backend, validate, ignore_index)


def linear_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, *, eps: float = PAPER_EPS, backend: Backend = "auto",
    validate: bool = True, ignore_index: int | None = None,
) -> torch.Tensor:
    """Mean over (sample, label) of 1 - Dice_i."""
    return loss(logits, target, None, LossSpec.linear(eps), backend, validate, ignore_index)


def log_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 1.0,
    eps: float = PAPER_EPS,
    backend: Backend = "auto",
    validate: bool = True,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """L_Dice(gamma): mean over (sample, label) of (-ln Dice_i)^gamma (gamma 1: logarithmic Dice)."""
    return loss(logits, target, None, LossSpec.log_dice(gamma, eps), backend, validate, ignore_index)


def cross_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    backend: Backend = "auto",
    validate: bool = True,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """L_Cross(gamma): mean over voxels of w_l * (-ln p_l)^gamma (gamma 1: weighted cross-entropy)."""
    return loss(logits, target, weights, LossSpec.cross(gamma), backend, validate, ignore_index)


class _LossModule(nn.Module):
    def __init__(self, spec: LossSpec, weights: torch.Tensor | None, backend: Backend, validate: bool,
                 ignore_index: int | None) -> None:
        super().__init__()
        check_backend_name(backend)
        self.spec = spec
        self.backend = backend
        self.validate = validate
        self.ignore_index = ignore_index
        self.register_buffer("weights", None if weights is None else torch.as_tensor(weights, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss(logits, target, self.weights, self.spec, self.backend, self.validate, self.ignore_index)

    def extra_repr(self) -> str:
        ignore = "" if self.ignore_index is None else f", ignore_index={self.ignore_index}"
        return f"{self.spec}, backend={self.backend!r}{ignore}"


class ExpLogLoss(_LossModule):
    """L_Exp as a module; `weights` (C,) from label_weights(training-set counts), or None for 1."""

    def __init__(
        self,
        weights: torch.Tensor | None = None,
        w_dice: float = PAPER_W_DICE,
        w_cross: float = PAPER_W_CROSS,
        gamma_dice: float = PAPER_GAMMA,
        gamma_cross: float = PAPER_GAMMA,
        eps: float = PAPER_EPS,
        backend: Backend = "auto",
        validate: bool = True,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(LossSpec.exp_log(w_dice, w_cross, gamma_dice, gamma_cross, eps), weights, backend, validate,
                         ignore_index)


class LinearDiceLoss(_LossModule):
    """Mean over (sample, label) of 1 - Dice_i."""

    def __init__(self, eps: float = PAPER_EPS, backend: Backend = "auto", validate: bool = True,
                 ignore_index: int | None = None) -> None:
        super().__init__(LossSpec.linear(eps), None, backend, validate, ignore_index)


class LogDiceLoss(_LossModule):
    """L_Dice(gamma) = mean over (sample, label) of (-ln Dice_i)^gamma."""

    def __init__(self, gamma: float = 1.0, eps: float = PAPER_EPS, backend: Backend = "auto", validate: bool = True,
                 ignore_index: int | None = None) -> None:
        super().__init__(LossSpec.log_dice(gamma, eps), None, backend, validate, ignore_index)


class CrossLoss(_LossModule):
    """L_Cross(gamma) = mean over voxels of w_l * (-ln p_l)^gamma."""

    def __init__(
        self, weights: torch.Tensor | None = None, gamma: float = 1.0, backend: Backend = "auto", validate: bool = True,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(LossSpec.cross(gamma), weights, backend, validate, ignore_index)
