"""A quick look at the exp-log loss: value, gradient norm and time per available backend on random logits.

python scripts/loss_demo.py [--size 32] [--labels 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from expseg_fast.losses import available_backends, exp_log_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="edge of the cubic volume (voxels)")
    parser.add_argument("--labels", type=int, default=20, help="number of labels C")
    args = parser.parse_args()
    if args.size < 1 or args.labels < 2:
        parser.error("--size must be >= 1 and --labels >= 2")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    shape = (1, args.labels, args.size, args.size, args.size)
    logits = torch.randn(shape, device=device)
    target = torch.randint(0, args.labels, (1, args.size, args.size, args.size), device=device)
    print(f"exp-log loss (w_dice 0.8, w_cross 0.2, gamma 0.3) on random logits {shape}, {device}")
    for backend in available_backends(device):
        z = logits.clone().requires_grad_(True)
        start = time.perf_counter()
        value = exp_log_loss(z, target, backend=backend)
        value.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        print(f"  {backend:9s} loss {value.item():.6f}  |grad| {z.grad.norm().item():.3e}  ({ms:.1f} ms, first call)")


if __name__ == "__main__":
    main()
