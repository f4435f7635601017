"""Shared test helpers: input makers and an independent float64 oracle of the loss (paper eqs. 1-3)."""

from __future__ import annotations

import pytest
import torch

from expseg_fast.losses import LossSpec, available_backends

SPECS = {
    "linear_dice": LossSpec.linear(),
    "log_dice": LossSpec.log_dice(1.0),
    "cross": LossSpec.cross(1.0),
    "exp_g1": LossSpec.exp_log(gamma_dice=1.0, gamma_cross=1.0),
    "exp_g2": LossSpec.exp_log(gamma_dice=2.0, gamma_cross=2.0),
    "exp_g03": LossSpec.exp_log(gamma_dice=0.3, gamma_cross=0.3),
}


# Triton on the CPU runs in its interpreter (TRITON_INTERPRET=1, set by conftest when there is no GPU);
# on a GPU machine the Triton kernels are tested on CUDA (test_loss_cuda.py) instead.
needs_triton_cpu = pytest.mark.skipif(
    "triton" not in available_backends("cpu"), reason="Triton on the CPU needs TRITON_INTERPRET=1 (no-GPU runs)"
)


def with_triton_designs(backends) -> list[str]:
    """The backends, with "triton" followed by "triton-rows": the Triton kernels' row design (both
    designs stay tested until the GPU benchmark has chosen one; see expseg_fast/kernels/explog.py)."""
    out = []
    for name in backends:
        out += [name, "triton-rows"] if name == "triton" else [name]
    return out


def use_backend(name: str) -> str:
    """Selects the Triton design a test name asks for (reset after each test by conftest) and
    returns the loss API's backend name."""
    if name.startswith("triton"):
        from expseg_fast.kernels import explog

        design = {"design": "rows" if name == "triton-rows" else "tiles"}
        explog.TUNING.update(stats=design, grad=design)
        return "triton"
    return name


def make_logits(shape, dtype=torch.float32, channels_last=False, scale=2.0, generator=None) -> torch.Tensor:
    z = (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    return z.to(memory_format=torch.channels_last_3d) if channels_last else z


def make_target(shape, num_labels, generator=None) -> torch.Tensor:
    n, _, d, h, w = shape
    return torch.randint(0, num_labels, (n, d, h, w), generator=generator)


def oracle_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
                spec: LossSpec) -> torch.Tensor:
    """The loss in float64 straight from the paper's formulas (differentiable by autograd)."""
    z = logits.double()
    n, c = z.shape[:2]
    e = torch.exp(z - z.amax(dim=1, keepdim=True))
    p = e / e.sum(dim=1, keepdim=True)
    delta = (target.unsqueeze(1) == torch.arange(c).view(1, c, 1, 1, 1)).double()
    i = (delta * p).flatten(2).sum(-1)
    g = delta.flatten(2).sum(-1)
    pp = p.flatten(2).sum(-1)
    dice = (2 * i + spec.eps) / (g + pp + spec.eps)
    out = torch.zeros((), dtype=torch.float64)
    if spec.w_dice:
        per = 1 - dice if spec.linear_dice else (-torch.log(dice)) ** spec.gamma_dice
        out = out + spec.w_dice * per.mean()
    if spec.w_cross:
        w = torch.ones(c, dtype=torch.float64) if weights is None else weights.double()
        t = -torch.log(p.gather(1, target.long().unsqueeze(1)).squeeze(1))
        out = out + spec.w_cross * (w[target.long()] * t**spec.gamma_cross).mean()
    return out


def loss_and_grad(fn, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.detach().clone().requires_grad_(True)
    value = fn(z)
    value.backward()
    return value.detach(), z.grad


def assert_grad_close(grad: torch.Tensor, ref_grad: torch.Tensor, rtol: float) -> None:
    """Relative accuracy, plus rounding in grad's subnormal range (tiny gradients in float16)."""
    subnormal_step = torch.finfo(grad.dtype).tiny * torch.finfo(grad.dtype).eps
    err = float((grad.cpu().double() - ref_grad).norm())
    assert err < rtol * float(ref_grad.norm()) + subnormal_step * grad.numel() ** 0.5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def mp_loss_and_grad(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, spec: LossSpec,
                     dps: int = 80):
    """Loss and d loss / d logits in `dps`-digit arithmetic (mpmath), straight from the formulas
    (DESIGN.md section 2, no stabilising rewrites): the judge for saturated logits, where float64
    loses 1 - p_l and -ln Dice_i to rounding. The gradient coefficient floor GRAD_FLOOR on u applies.
    Returns (loss float, gradient float64 tensor shaped like logits)."""
    import mpmath as mp

    from expseg_fast.losses import GRAD_FLOOR

    z = logits.detach().double().contiguous()
    n_s, c = z.shape[:2]
    zf = z.reshape(n_s, c, -1).tolist()
    lf = target.reshape(n_s, -1).tolist()
    v = len(lf[0])
    w = [1.0] * c if weights is None else weights.double().tolist()
    grad = [[[0.0] * v for _ in range(c)] for _ in range(n_s)]
    with mp.workdps(dps):
        eps, nc, nv = mp.mpf(spec.eps), mp.mpf(n_s * c), mp.mpf(n_s * v)
        total = mp.mpf(0)
        for n in range(n_s):
            p = []
            for x in range(v):
                e = [mp.exp(mp.mpf(zf[n][j][x])) for j in range(c)]
                s = mp.fsum(e)
                p.append([ej / s for ej in e])
            dl_dp = [[mp.mpf(0)] * c for _ in range(v)]
            if spec.w_dice:
                for i in range(c):
                    inter = mp.fsum(p[x][i] for x in range(v) if lf[n][x] == i)
                    pred = mp.fsum(p[x][i] for x in range(v))
                    count = sum(1 for x in range(v) if lf[n][x] == i)
                    a_, b_ = 2 * inter + eps, count + pred + eps
                    dice = a_ / b_
                    u = -mp.log(dice)
                    if spec.linear_dice:
                        phi, dphi = 1 - dice, dice
                    else:
                        phi = u**spec.gamma_dice
                        dphi = spec.gamma_dice * max(u, mp.mpf(GRAD_FLOOR)) ** (spec.gamma_dice - 1)
                    total += spec.w_dice * phi / nc
                    for x in range(v):
                        dl_dp[x][i] += spec.w_dice * dphi * (1 / b_ - (2 / a_ if lf[n][x] == i else 0)) / nc
            for x in range(v):
                label = lf[n][x]
                px = p[x]
                gbar = mp.fsum(px[k] * dl_dp[x][k] for k in range(c))
                dz = [px[j] * (dl_dp[x][j] - gbar) for j in range(c)]
                if spec.w_cross:
                    t = -mp.log(px[label])
                    total += spec.w_cross * w[label] * t**spec.gamma_cross / nv
                    coef = spec.w_cross * w[label] * spec.gamma_cross * t ** (spec.gamma_cross - 1) / nv
                    for j in range(c):
                        dz[j] += coef * (px[j] - (1 if j == label else 0))
                for j in range(c):
                    grad[n][j][x] = float(dz[j])
        value = float(total)
    return value, torch.tensor(grad, dtype=torch.float64).reshape(z.shape)


def write_case(root, name: str, seed: int, shape=(12, 12, 12), spacing: float = 2.0) -> None:
    """One case NAME of a dataset folder (imagesTr/NAME_0000.nii.gz, labelsTr/NAME.nii.gz): a random
    box of class 1 and a ball of class 2 on background, the image their intensities plus noise; the
    voxel data is unique to the seed."""
    import numpy as np

    from expseg_fast.data import save_volume

    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    lo = rng.integers(1, 4, 3)
    labels[lo[0]:lo[0] + 5, lo[1]:lo[1] + 6, lo[2]:lo[2] + 4] = 1
    grid = np.indices(shape).astype(np.float64)
    centre = rng.uniform(4, np.array(shape) - 4)
    labels[((grid - centre[:, None, None, None]) ** 2).sum(0) < 6] = 2
    image = (labels * 1.5 + rng.normal(scale=0.3, size=shape)).astype(np.float32)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    save_volume(root / "imagesTr" / f"{name}_0000.nii.gz", image, affine)
    save_volume(root / "labelsTr" / f"{name}.nii.gz", labels, affine)


def write_dataset(root, n: int, seed: int = 0, first: int = 0):
    """A dataset folder of cases c{first}..c{first + n - 1} (write_case, seeds seed + index) and its
    label map root/map.json (background, box, ball); returns the map's path."""
    import json
    from pathlib import Path

    root = Path(root)
    for i in range(first, first + n):
        write_case(root, f"c{i}", seed + i)
    classes = [{"name": "background", "ids": [0]}, {"name": "box", "ids": [1]}, {"name": "ball", "ids": [2]}]
    (root / "map.json").write_text(json.dumps({"classes": classes}))
    return root / "map.json"


def one_epoch_run(root, cases: int, seed: int):
    """A finished one-epoch run (16^3, width 4) in root/run on `cases` generated cases (write_dataset) in
    root/data; returns the run's folder."""
    from pathlib import Path

    from expseg_fast.config import TrainConfig
    from expseg_fast.training import train

    root = Path(root)
    label_map = write_dataset(root / "data", cases)
    train(TrainConfig(out=str(root / "run"), data=str(root / "data"), label_map=str(label_map), size=16, width=4,
                      epochs=1, seed=seed, loader_workers=0))
    return root / "run"


def readme_block(heading: str) -> str:
    """The first fenced code block under the README's `heading` line (e.g. "### In MONAI")."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    after = text.split(f"\n{heading}\n", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]
