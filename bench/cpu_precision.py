"""The main command's training step on the CPU in four numeric formats: is bf16 worth it on this processor?

python -m bench.cpu_precision [--size 48 64] [--width 12] [--rounds 5] [--out DIR]
Variants, same run, interleaved round by round (so a busy shared machine slows all alike): fp32 and bf16
autocast, each with contiguous and channels-last tensors. One step is what the trainer does per subject
(forward, the exp-log loss with the auto backend, backward, NAdam) at batch 1, 20 classes. bf16 pays only
where the processor multiplies bf16 natively (avx512_bf16, amx_bf16 in /proc/cpuinfo); elsewhere it is
converted to fp32 and slower. Prints a table (median ms, ratio to fp32) and writes cpu_precision.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.timing import elapsed_ms
from expseg_fast.config import TrainConfig
from expseg_fast.losses import loss
from expseg_fast.machine import cpu_bf16_units, processor_name
from expseg_fast.models import build_model

VARIANTS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def step_fn(size: int, width: int, precision: str, channels_last: bool):
    torch.manual_seed(0)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = build_model("ours", 20, width).to(memory_format=memory_format)
    optimizer = torch.optim.NAdam(model.parameters(), lr=1e-3)
    image = torch.randn(1, 1, size, size, size).contiguous(memory_format=memory_format)
    target = torch.randint(0, 20, (1, size, size, size), dtype=torch.uint8)
    weights = torch.ones(20)
    spec = TrainConfig().loss_spec()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(image)
        loss(logits, target, weights, spec, validate=False).backward()
        optimizer.step()

    step()  # the optimizer's state, oneDNN's primitives
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[48, 64])
    parser.add_argument("--width", type=int, default=TrainConfig().width)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for size in args.size:
        steps = {v: step_fn(size, args.width, *v) for v in VARIANTS}
        times: dict = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v, step in steps.items():
                times[v].append(elapsed_ms(step))
        base = statistics.median(times[VARIANTS[0]])
        for (precision, cl), t in times.items():
            rows.append({"size": size, "precision": precision, "channels_last": cl, "ms": statistics.median(t),
                         "vs_fp32": base / statistics.median(t)})
    result = {"processor": processor_name(), "bf16_units": cpu_bf16_units(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "width": args.width, "rounds": args.rounds, "rows": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu_precision.json").write_text(json.dumps(result, indent=1))
    print(f"{result['processor']}: bf16 units {', '.join(result['bf16_units']) or 'none'}; "
          f"{result['threads']} threads, width {args.width}, torch {torch.__version__}")
    print("| size | precision | channels-last | step ms (median) | speed vs fp32 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']}³ | {r['precision']} | {'yes' if r['channels_last'] else 'no'} | {r['ms']:.0f} | "
              f"{r['vs_fp32']:.2f}× |")


if __name__ == "__main__":
    main()
