"""The label-map generator's time per training example against the network's training step, in the same
run, at a preset's settings (it must not dominate the step).

python -m bench.synth_step [--preset synth-cpu] [--size N] [--device cpu|cuda] [--repeats 5] [--norms batch instance]
                           [--malloc keep|system] [--conv-backward engine|pytorch] [--partial-volume 1 2]
                           [--out DIR]
Prints one table, a row per normalisation and generator partial volume (all measured in this run): generator
ms per example (the plan's whole-scan grid, then the window), network step ms (the trainer's TrainStep:
forward, fused loss, backward, the finiteness check, NAdam) at the preset's size and width, in the precision
the trainer takes on this device (scripts/train.py: the preset's, fp32 on a CPU without bf16 units), and
their ratio. On the CPU the process keeps the memory it frees, as the trainer's does
(machine.keep_freed_memory); `--malloc system` measures glibc's default instead (one process each: the
setting is process-wide); `--conv-backward pytorch` measures the fp32 CPU convolutions' backward as PyTorch
computes it instead of with the engine's native weight gradient (expseg_fast/models/conv.py), the baseline
of that op.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.outputs import publish
from bench.timing import median_ms
from expseg_fast.config import DTYPES, TrainConfig, preset_precision
from expseg_fast.data.anatomy import CLASSES_FILE, GenerationTable, label_map_files
from expseg_fast.data.dataset import LabelMap
from expseg_fast.data.synth import ImageGenerator, LabelMapSource
from expseg_fast.machine import keep_freed_memory
from expseg_fast.models import NORMS, conv
from expseg_fast.training.step import TrainStep


def measure(preset: str, device: str, repeats: int, size: int | None = None, norm: str | None = None,
            partial_volume: int | None = None) -> dict:
    overrides = {k: v for k, v in (("size", size), ("norm", norm), ("synth_partial_volume", partial_volume)) if v}
    config = TrainConfig.for_preset(preset, **overrides)
    precision, _ = preset_precision(preset, config.size, config.model, device)  # as the trainer: fp32 where
    config = TrainConfig.for_preset(preset, **overrides, precision=precision)  # the CPU lacks bf16 units
    dev, plan = torch.device(device), config.plan()
    table, classes = GenerationTable.read(), LabelMap.from_json(CLASSES_FILE)
    source = LabelMapSource(label_map_files()[0], plan, dev, config.synth_settings().field_of_view_mm)
    generator = ImageGenerator(table, classes, plan, config.synth_settings(), dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    image, labels = generator(source, gen)
    generate_ms = median_ms(lambda: generator(source, gen), repeats, warmup=1, device=device)
    model = config.network(len(classes.names)).to(dev)
    memory_format = config.memory_format
    model = model.to(memory_format=memory_format).train()
    optimizer = torch.optim.NAdam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler(dev.type, enabled=config.precision == "fp16")
    weights = torch.ones(len(classes.names), device=dev)
    step = TrainStep(model, model, optimizer, scaler, weights, config.loss_spec(), DTYPES[config.precision],
                     memory_format)  # the trainer's own step (eager)
    batch, target = image[None], labels[None]
    step_ms = median_ms(lambda: step(batch, target), repeats, warmup=1, device=device)
    return {"preset": preset, "device": device, "grid": list(source.grid.target_shape), "size": plan.size,
            "width": config.width, "norm": config.norm, "partial_volume": config.synth_partial_volume,
            "precision": config.precision, "generator_ms": generate_ms,
            "step_ms": step_ms, "generator_share": generate_ms / (generate_ms + step_ms), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="synth-cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=None, help="the window's edge (default: the preset's)")
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS,
                        help="the network's normalisations to measure (default: each)")
    parser.add_argument("--malloc", choices=["keep", "system"], default="keep",
                        help="CPU: keep freed memory as the trainer does (default), or glibc's default")
    parser.add_argument("--conv-backward", choices=["engine", "pytorch"], default="engine",
                        help="the fp32 CPU convolutions' backward: the engine's native weight gradient (default) "
                             "or PyTorch's")
    parser.add_argument("--partial-volume", type=int, nargs="+", default=[None],
                        help="the generator's partial volume points per axis to measure (default: the preset's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.conv_backward == "pytorch":
        conv.DEVICE_TYPES = frozenset()
    kept = args.device == "cpu" and args.malloc == "keep" and keep_freed_memory()
    rows = [dict(measure(args.preset, args.device, args.repeats, args.size, norm, pv), freed_memory_kept=kept,
                 conv_backward=args.conv_backward) for norm in args.norms for pv in args.partial_volume]
    table = "| preset | device | norm | partial volume | conv backward | whole-scan grid | window | generator ms | " \
            "step ms | generator share |\n|---|---|---|---|---|---|---|---|---|---|\n" + "".join(
        f"| {row['preset']} | {row['device']} | {row['norm']} | {row['partial_volume']}^3 | {row['conv_backward']} | "
        f"{'x'.join(map(str, row['grid']))} | {row['size']}^3 | "
        f"{row['generator_ms']:.0f} | {row['step_ms']:.0f} | {100 * row['generator_share']:.0f} % |\n" for row in rows)
    publish(args.out, "synth_step", rows, "The label-map generator against the training step", table)


if __name__ == "__main__":
    main()
