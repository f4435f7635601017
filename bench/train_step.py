"""One training step (forward, loss, backward, NAdam step) of our network: time and peak memory.

python -m bench.train_step [--device cuda|cpu] [--size 128] [--out DIR]
Variants, same run: the eager fp32 baseline with the reference loss, and the engine (bf16 autocast where
the device multiplies bf16 natively, as the trainer's presets; channels-last, fused loss: the auto
backend, the trainer's step: expseg_fast/training/step.py), each
with the paper's deep supervision (levels 0-2) and with the 192-channel level fused too; the engine's
step compiled (torch.compile of forward and backward) and, on CUDA, captured whole in one CUDA graph,
each with its first call's seconds (compilation, capture) apart and its loss curve over 20 steps against
the eager engine's (the same seeded inputs and weights); on CUDA the engine is also run under a 12 GB
cap (torch.cuda.set_per_process_memory_fraction) to show it fits a 12 GB card, and the largest cube edge
that trains under that cap with all four levels fused is searched (steps of 16 from --size up to
--max-size). Writes train_step.json/.md.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from bench.outputs import write_outputs
from bench.timing import elapsed_ms, median_ms
from expseg_fast.config import DTYPES, TrainConfig
from expseg_fast.losses import LossSpec, exp_log_loss
from expseg_fast.machine import cpu_bf16_units
from expseg_fast.models import ExpLogNet, NetConfig
from expseg_fast.training.step import TrainStep

FUSIONS = {"paper (24, 48, 96)": (0, 1, 2), "full (24, 48, 96, 192)": (0, 1, 2, 3)}
MODES = {"compiled": "step compiled (torch.compile)", "cuda_graph": "whole step in one CUDA graph"}
CAP_BYTES = 12 * 2**30  # a 12 GB card


def largest_fitting(sizes, fits) -> int | None:
    """The last of the increasing sizes for which fits(size) holds, stopping at the first that does not."""
    found = None
    for size in sizes:
        if not fits(size):
            break
        found = size
    return found


def fits_under_cap(size: int, fuse: tuple[int, ...]) -> bool:
    """Whether the engine's training step at size^3 runs under the 12 GB cap (CUDA)."""
    try:
        measure("cuda", size, fuse, True, repeats=1)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def engine_precision(device: str) -> str:
    """The engine's precision on a device, as the trainer's presets choose it: bf16 on CUDA and on a CPU that
    multiplies bf16 natively, else fp32 (emulated bf16 takes seconds a step: expseg_fast/config.py)."""
    return "bf16" if device == "cuda" or cpu_bf16_units() else "fp32"


def step_fn(model, optimizer, image, target, engine: bool):
    backend = "auto" if engine else "reference"
    autocast = engine and engine_precision(image.device.type) == "bf16"

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(image)
        loss = exp_log_loss(logits, target, backend=backend, validate=False)
        loss.backward()
        optimizer.step()
        return loss

    return step


def engine_step(device: str, size: int, fuse: tuple[int, ...], mode: str) -> TrainStep:
    """The trainer's step (engine_precision, channels-last, fused loss) of a freshly seeded network in `mode`."""
    torch.manual_seed(0)
    model = ExpLogNet(NetConfig(num_labels=20, fuse_levels=fuse)).to(device).to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.NAdam(model.parameters(), lr=1e-3, capturable=mode == "cuda_graph")
    return TrainStep(model, model, optimizer, torch.amp.GradScaler(device, enabled=False),
                     torch.ones(20, device=device), LossSpec(), DTYPES[engine_precision(device)],
                     torch.channels_last_3d, mode)


def step_modes(device: str, no_compile: bool) -> list[str]:
    """The step modes beyond eager that the trainer takes on device (TrainConfig.device_problem); on the
    CPU without compiled where --no-compile asks."""
    return [mode for mode in MODES if TrainConfig(step_mode=mode).device_problem(device) is None
            and not (no_compile and device == "cpu" and mode == "compiled")]


def batch(device: str, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 1, size, size, size, generator=gen)
    return image.to(device), torch.randint(0, 20, (1, size, size, size), generator=gen).to(device)


def curve(device: str, size: int, fuse: tuple[int, ...], mode: str, steps: int = 20) -> list[float]:
    """The loss of `steps` steps of the engine in `mode` on seeded inputs (one per step)."""
    step = engine_step(device, size, fuse, mode)
    return [step(*batch(device, size, seed))[0] for seed in range(steps)]


def measure_mode(device: str, size: int, fuse: tuple[int, ...], mode: str, repeats: int) -> dict:
    """ms per step of the engine in `mode`, its first call's seconds, peak memory, and its loss curve
    against the eager engine's."""
    step = engine_step(device, size, fuse, mode)
    image, target = batch(device, size)
    first_s = elapsed_ms(lambda: step(image, target), device) / 1e3
    first_s += elapsed_ms(lambda: step(image, target), device) / 1e3  # the CUDA graph is captured at the second
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = median_ms(lambda: step(image, target), repeats, device=device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    eager, mine = curve(device, size, fuse, "eager"), curve(device, size, fuse, mode)
    deviation = max(abs(a - b) / abs(a) for a, b in zip(eager, mine))
    return {"ms": ms, "peak_GiB": peak, "first_call_s": first_s, "curve": mine, "eager_curve": eager,
            "max_curve_rel_dev": deviation}


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
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = median_ms(step, repeats, device=device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"ms": ms, "peak_GiB": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=None, help="cube edge (default 128 on CUDA, 32 on the CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-size", type=int, default=256, help="largest edge tried under the 12 GB cap (CUDA)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled step (the CPU rehearsal: "
                        "minutes of compilation; tests/test_graph_options.py checks that step)")
    args = parser.parse_args()
    size = args.size or (128 if args.device == "cuda" else 32)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes, as the trainer (every variant)
    rows: list[dict] = []
    for fusion, fuse in FUSIONS.items():
        for engine in (False, True):
            variant = (f"engine ({engine_precision(args.device)}, channels-last, fused loss)" if engine
                       else "eager fp32, reference loss")
            row = {"fusion": fusion, "variant": variant}
            row.update(measure(args.device, size, fuse, engine, args.repeats))
            rows.append(row)
            write(rows, args.device, size, args.out)
        for mode in step_modes(args.device, args.no_compile):
            if fusion.startswith("paper") or args.device == "cuda":  # on the CPU one compilation is enough
                rows.append({"fusion": fusion, "variant": f"engine, {MODES[mode]}",
                             **measure_mode(args.device, size, fuse, mode, args.repeats)})
                write(rows, args.device, size, args.out)
        if args.device == "cuda":  # the engine on an emulated 12 GB card
            with memory_cap():
                row = {"fusion": fusion, "variant": "engine under a 12 GB cap"}
                try:
                    row.update(measure(args.device, size, fuse, True, args.repeats))
                except torch.OutOfMemoryError:
                    row.update(ms=float("nan"), peak_GiB=float("inf"))
            rows.append(row)
            write(rows, args.device, size, args.out)
    if args.device == "cuda":  # last: a search stopped by the suite's time limit loses nothing else
        full = FUSIONS["full (24, 48, 96, 192)"]
        with memory_cap():
            edge = largest_fitting(range(size, args.max_size + 1, 16), lambda e: fits_under_cap(e, full))
        rows.append({"fusion": "full (24, 48, 96, 192)", "variant": "largest edge under a 12 GB cap", "edge": edge})
        write(rows, args.device, size, args.out)
    print(markdown(rows, args.device, size))


@contextlib.contextmanager
def memory_cap():
    """The CUDA caching allocator limited to CAP_BYTES of this card."""
    torch.cuda.set_per_process_memory_fraction(CAP_BYTES / torch.cuda.get_device_properties(0).total_memory)
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def markdown(rows: list[dict], device: str, size: int) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    timed = [r for r in rows if "ms" in r]
    lines = [f"Training step at {size}^3, batch 1, {name}, torch {torch.__version__}", "",
             "| deep supervision | variant | ms (median) | peak GiB | first call s | loss curve vs eager (20 steps) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['fusion']} | {r['variant']} | {r['ms']:.1f} | {r['peak_GiB']:.2f} | "
              f"{r['first_call_s']:.1f} | max rel. dev. {r['max_curve_rel_dev']:.1e} |" if "curve" in r else
              f"| {r['fusion']} | {r['variant']} | {r['ms']:.1f} | {r['peak_GiB']:.2f} | - | - |" for r in timed]
    base = {r["fusion"]: r for r in timed if r["variant"].startswith("eager")}
    lines.append("")
    for r in rows:
        if r["variant"].startswith("engine ("):
            b = base[r["fusion"]]
            lines.append(f"- {r['fusion']}: engine {b['ms'] / r['ms']:.2f}x faster than eager fp32"
                         + (f", {b['peak_GiB'] / r['peak_GiB']:.2f}x less memory" if device == "cuda" else ""))
        if "curve" in r:
            engine = next(e for e in timed if e["fusion"] == r["fusion"] and e["variant"].startswith("engine ("))
            lines.append(f"- {r['fusion']}: {r['variant']} {engine['ms'] / r['ms']:.2f}x the eager engine's speed, "
                         f"first call {r['first_call_s']:.1f} s")
        if "edge" in r:
            lines.append(f"- largest cube edge (steps of 16) that trains under 12 GB with all four levels fused: "
                         f"{r['edge']}")
    return "\n".join(lines) + "\n"


def write(rows: list[dict], device: str, size: int, out: Path | None) -> None:
    """Prints the newest row; writes the table and JSON so far (a run stopped at a time limit keeps them)."""
    print(rows[-1], flush=True)
    if out:
        write_outputs(out, "train_step", rows, markdown(rows, device, size))


if __name__ == "__main__":
    main()
