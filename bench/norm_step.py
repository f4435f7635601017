"""The normalisation + ReLU after a convolution, forward + backward, against its memory floor: the engine's
fused instance norm, GroupNorm + ReLU (what norm="instance" was) and BatchNorm + ReLU (norm="batch"), bf16
channels-last under autocast (as the presets train), at the generator presets' full-resolution shapes.
The floor: the forward reads x twice and writes y, the backward reads grad_y, x and y twice and writes
grad_x — 8 passes over the activation's bytes — at the device's copy bandwidth, measured in the same run.

python -m bench.norm_step [--device cpu|cuda] [--shapes synth-cpu synth-paper] [--size N] [--repeats 10]
                          [--out DIR]
Prints one table; writes DIR/norm_step.json (a row per shape and kind) and DIR/norm_step.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from bench.outputs import publish
from bench.timing import median_ms
from expseg_fast.models import instance_norm as op
from expseg_fast.models.instance_norm import InstanceNormReLU

SHAPES = {"synth-cpu": (1, 12, 64), "synth-paper": (1, 24, 128)}  # (N, C, edge) of the first block's features
KINDS = ("fused", "groupnorm", "batchnorm")
PASSES = 8  # over the activation, forward + backward


def layers(kind: str, channels: int) -> nn.Module:
    """The normalisation + ReLU of a kind (KINDS)."""
    if kind == "fused":
        return InstanceNormReLU(channels)
    norm = nn.GroupNorm(channels, channels) if kind == "groupnorm" else nn.BatchNorm3d(channels)
    return nn.Sequential(norm, nn.ReLU())


def forward_backward(kind: str, n: int, c: int, size: int, device: str):
    """(step, x): one forward + backward of the kind's layers on a bf16 channels-last (n, c, size^3) x
    under bf16 autocast (GroupNorm and BatchNorm then run in fp32, as in training)."""
    torch.manual_seed(0)
    module = layers(kind, c).to(device)
    x = torch.randn(n, c, size, size, size, device=device, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    grad = torch.randn_like(x)

    def step() -> None:
        x.grad = None
        with torch.autocast(device, dtype=torch.bfloat16):
            y = module(x)
        y.backward(grad.to(y.dtype))

    return step, x


def copy_bandwidth(device: str, megabytes: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy (read + write) of `megabytes`."""
    a = torch.empty(megabytes << 18, device=device)  # float32: 4 bytes
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), repeats, warmup=2, device=device)
    return 2 * a.numel() * a.element_size() / (ms / 1e3)


def measure(device: str, shapes: list[str], size: int | None, repeats: int) -> list[dict]:
    bandwidth = copy_bandwidth(device, 256 if device == "cuda" else 64, repeats)
    rows = []
    for shape in shapes:
        n, c, edge = SHAPES[shape]
        edge = size or edge
        for kind in KINDS:
            if kind == "fused" and device not in op.DEVICE_TYPES:
                continue
            step, x = forward_backward(kind, n, c, edge, device)
            ms = median_ms(step, repeats, warmup=2, device=device)
            assert x.grad is not None and x.grad.dtype == torch.bfloat16
            floor_ms = 1e3 * PASSES * x.numel() * x.element_size() / bandwidth
            rows.append({"shape": shape, "size": [n, c, edge, edge, edge], "kind": kind, "device": device, "ms": ms,
                         "floor_ms": floor_ms, "over_floor": ms / floor_ms, "copy_gbs": bandwidth / 1e9,
                         "torch": torch.__version__, "threads": torch.get_num_threads()})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape | device | kind | ms (fwd + bwd) | floor ms | × floor |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} {'x'.join(map(str, r['size']))} | {r['device']} | {r['kind']} | {r['ms']:.2f} | "
              f"{r['floor_ms']:.2f} | {r['over_floor']:.1f} |" for r in rows]
    if not rows:
        return ""
    return "\n".join(lines) + f"\n\nCopy bandwidth measured in this run: {rows[0]['copy_gbs']:.0f} GB/s.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--size", type=int, default=None, help="the features' edge (default: each shape's)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = measure(args.device, args.shapes, args.size, args.repeats)
    publish(args.out, "norm_step", rows, "Normalisation + ReLU against its memory floor", table(rows))


if __name__ == "__main__":
    main()
