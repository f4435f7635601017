"""nnU-Net v2's 3d_fullres training step with its default loss against nnUNetTrainerExpLog's: ms per step
and peak memory, the same network, batch and targets in the same run.

Both steps are nnU-Net's own (nnUNetTrainer.train_step): SGD (Nesterov, momentum 0.99), autocast (fp16)
and a GradScaler on CUDA, gradient clipping at 12, deep supervision through nnU-Net's DeepSupervisionWrapper
with its level weights (halved per level, the lowest dropped). The network is the PlainConvUNet that
nnU-Net plans for a 1 mm brain MRI dataset at a 128^3 patch (six stages of 32-320 features, batch 2); the
losses: nnU-Net's DC_and_CE_loss (MemoryEfficientSoftDiceLoss without background + cross-entropy), and
L_Exp through the fused op (expseg_fast.integrations.monai.ExpLogLoss, the trainer's).

python -m bench.nnunet_step [--device cuda|cpu] [--size 128] [--stages 6] [--classes 20] [--batch 2]
                            [--repeats 10] [--out DIR]
Writes DIR/nnunet_step.json and .md. Needs nnunetv2 (requirements-integrations.txt; the GPU machine gets
nnunetv2 and dynamic-network-architectures from .whl/, which is all this imports of them).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from bench.outputs import publish
from bench.timing import median_ms
from expseg_fast.integrations.monai import ExpLogLoss

FEATURES = (32, 64, 128, 256, 320, 320)


def network(stages: int, classes: int) -> PlainConvUNet:
    """nnU-Net's planned 3d_fullres PlainConvUNet with deep supervision (its defaults as the planner writes them)."""
    return PlainConvUNet(1, stages, FEATURES[:stages], torch.nn.Conv3d, 3, [1] + [2] * (stages - 1), [2] * stages,
                         classes, [2] * (stages - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)


def level_weights(levels: int) -> np.ndarray:
    """nnU-Net's deep-supervision weights: 1 / 2^i, the lowest level 0, normalised."""
    weights = np.array([1 / 2**i for i in range(levels)])
    weights[-1] = 0
    return weights / weights.sum()


def losses(levels: int, classes: int, counts: torch.Tensor) -> dict[str, torch.nn.Module]:
    from expseg_fast.losses import label_weights

    default = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                             weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    return {"nnU-Net default (Dice + CE)": DeepSupervisionWrapper(default, level_weights(levels)),
            "nnUNetTrainerExpLog (L_Exp, fused op)": DeepSupervisionWrapper(ExpLogLoss(label_weights(counts)),
                                                                            level_weights(levels))}


def batch(device: str, size: int, batch_size: int, classes: int, stages: int):
    """(image (B, 1, s, s, s), targets at each output's scale (B, 1, ...) float as nnU-Net's loader gives them)."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(batch_size, 1, size, size, size, generator=gen)
    coarse = torch.randint(0, classes, (batch_size, 1, size // 8, size // 8, size // 8), generator=gen).float()
    label = F.interpolate(coarse, size=(size,) * 3, mode="nearest")
    targets = [F.interpolate(label, scale_factor=0.5**i, mode="nearest") for i in range(stages - 1)]
    return image.to(device), [t.to(device) for t in targets]


def step_fn(model, loss, image, targets, device: str):
    optimizer = torch.optim.SGD(model.parameters(), 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    scaler = torch.amp.GradScaler("cuda") if device == "cuda" else None

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, enabled=True) if device == "cuda" else contextlib.nullcontext():
            value = loss(model(image), targets)
        if scaler is None:
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
            optimizer.step()
        else:
            scaler.scale(value).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        return value.detach()

    return step


def measure(device: str, size: int, stages: int, classes: int, batch_size: int, repeats: int) -> list[dict]:
    image, targets = batch(device, size, batch_size, classes, stages)
    counts = torch.bincount(targets[0].long().flatten().cpu(), minlength=classes).clamp_min(1)
    rows = []
    for name, loss in losses(stages - 1, classes, counts).items():
        torch.manual_seed(0)
        model = network(stages, classes).to(device)
        step = step_fn(model, loss, image, targets, device)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ms = median_ms(step, repeats, warmup=2, device=device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        rows.append({"loss": name, "device": device, "patch": [size] * 3, "batch": batch_size, "stages": stages,
                     "classes": classes, "ms": ms, "peak_GiB": peak, "torch": torch.__version__})
    return rows


def table(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"Patch {'x'.join(map(str, r0['patch']))}, batch {r0['batch']}, {r0['stages']} stages, {r0['classes']} "
             f"classes, {r0['device']}:", "", "| loss | ms per step (median) | peak GiB |", "|---|---|---|"]
    lines += [f"| {r['loss']} | {r['ms']:.1f} | {r['peak_GiB']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--stages", type=int, default=6)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = measure(args.device, args.size, args.stages, args.classes, args.batch, args.repeats)
    publish(args.out, "nnunet_step", rows, "nnU-Net's 3d_fullres step: its default loss and L_Exp", table(rows))


if __name__ == "__main__":
    main()
