"""One training step (forward, loss, backward, NAdam step) of our network: time and peak memory.

python bench/train_step.py [--device cuda|cpu] [--size 128] [--out DIR]
Variants, same run: the eager fp32 baseline with the reference loss, and the engine (bf16 autocast,
channels-last, fused loss: the auto backend), each with the paper's deep supervision (levels 0-2) and
with the 192-channel level fused too; on CUDA the engine is also run under a 12 GB cap
(torch.cuda.set_per_process_memory_fraction) to show it fits a 12 GB card. Writes train_step.json/.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from expseg_fast.losses import exp_log_loss
from expseg_fast.models import ExpLogNet, NetConfig

FUSIONS = {"paper (24, 48, 96)": (0, 1, 2), "full (24, 48, 96, 192)": (0, 1, 2, 3)}


def step_fn(model, optimizer, image, target, engine: bool):
    backend = "auto" if engine else "reference"

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=engine):
            logits = model(image)
        loss = exp_log_loss(logits, target, backend=backend, validate=False)
        loss.backward()
        optimizer.step()
        return loss

    return step


def measure(device: str, size: int, fuse: tuple[int, ...], engine: bool, repeats: int) -> dict:
    torch.manual_seed(0)
    model = ExpLogNet(NetConfig(num_labels=20, fuse_levels=fuse)).to(device)
    image = torch.randn(1, 1, size, size, size, device=device)
    target = torch.randint(0, 20, (1, size, size, size), device=device)
    if engine:
        model = model.to(memory_format=torch.channels_last_3d)
        image = image.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.NAdam(model.parameters(), lr=1e-3)
    step = step_fn(model, optimizer, image, target, engine)
    step()  # optimizer state, kernels
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"ms": statistics.median(times), "peak_GiB": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=None, help="cube edge (default 128 on CUDA, 32 on the CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    size = args.size or (128 if args.device == "cuda" else 32)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes, as the trainer (every variant)
    rows = []
    for fusion, fuse in FUSIONS.items():
        for engine in (False, True):
            row = {"fusion": fusion, "variant": "engine (bf16, channels-last, fused loss)" if engine else "eager fp32, reference loss"}
            row.update(measure(args.device, size, fuse, engine, args.repeats))
            rows.append(row)
            print(row, flush=True)
        if args.device == "cuda":  # the engine on an emulated 12 GB card
            fraction = 12 * 2**30 / torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(fraction)
            torch.cuda.empty_cache()
            try:
                row = {"fusion": fusion, "variant": "engine under a 12 GB cap"}
                row.update(measure(args.device, size, fuse, True, args.repeats))
            except torch.OutOfMemoryError:
                row.update(ms=float("nan"), peak_GiB=float("inf"))
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0)
            rows.append(row)
            print(row, flush=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [f"Training step at {size}^3, batch 1, {name}, torch {torch.__version__}", "",
             "| deep supervision | variant | ms (median) | peak GiB |", "|---|---|---|---|"]
    lines += [f"| {r['fusion']} | {r['variant']} | {r['ms']:.1f} | {r['peak_GiB']:.2f} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_step.md").write_text(table)
        (args.out / "train_step.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
