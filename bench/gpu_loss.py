"""GPU benchmark of the loss: forward + backward at (1, 20, 128^3), every backend, same run, same card.

python bench/gpu_loss.py --out DIR
Measures the device-to-device copy bandwidth (the DRAM ceiling), then for fp32 and bf16 logits in both
layouts: median time (triton.testing.do_bench) and peak extra memory of forward + backward for the
eager reference, torch.compile(reference) (bf16 only: compiles cost device time), the native CUDA op
and the Triton kernels, with the Triton launch configuration swept first (bf16, per layout). Writes gpu_loss.json and
gpu_loss.md (card, driver, torch and Triton versions) to DIR.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from expseg_fast.kernels import explog as triton_explog
from expseg_fast.losses import LossSpec, loss
from expseg_fast.losses.reference import reference_loss

SHAPE = (1, 20, 128, 128, 128)
SPEC = LossSpec()


def environment() -> dict:
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()
    return {"card": smi, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    x = torch.randn(2**29, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def inputs(dtype: torch.dtype, channels_last: bool):
    torch.manual_seed(0)
    logits = (2 * torch.randn(SHAPE, device="cuda")).to(dtype)
    if channels_last:
        logits = logits.to(memory_format=torch.channels_last_3d)
    target = torch.randint(0, SHAPE[1], (SHAPE[0], *SHAPE[2:]), device="cuda")
    weights = torch.rand(SHAPE[1], device="cuda") + 0.5
    return logits.requires_grad_(True), target, weights


def loss_fn(variant: str):
    if variant == "eager":
        return lambda z, t, w: reference_loss(z, t, w, SPEC)
    if variant == "compile":
        compiled = torch.compile(reference_loss)
        return lambda z, t, w: compiled(z, t, w, SPEC)
    return lambda z, t, w: loss(z, t, w, SPEC, backend=variant, validate=False)


def measure(variant: str, dtype: torch.dtype, channels_last: bool, rep: int = 200) -> dict:
    logits, target, weights = inputs(dtype, channels_last)
    fn = loss_fn(variant)

    def step():
        logits.grad = None
        fn(logits, target, weights).backward()

    step()  # compile / load
    torch.cuda.synchronize()
    ms = do_bench(step, warmup=25, rep=rep, return_mode="median")
    logits.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grad = logits.grad.float()
    return {"ms": ms, "peak_extra_bytes": peak, "grad": grad}


def floor_ms(dtype: torch.dtype, bandwidth: float) -> float:
    """Logits read twice, target (int64) read twice, gradient written once, at the copy bandwidth."""
    n, c = SHAPE[:2]
    voxels = n * SHAPE[2] * SHAPE[3] * SHAPE[4]
    size = torch.tensor([], dtype=dtype).element_size()
    return (3 * n * c * voxels * size + 2 * voxels * 8) / bandwidth * 1e3


def tune_triton(dtype: torch.dtype, channels_last: bool) -> list[dict]:
    rows = []
    # The best and runner-up configurations of the H100 sweeps (bench/NOTES.md), kept short: each
    # configuration compiles its kernels, which costs device time.
    for block_v, warps in ((64, 2), (64, 4), (64, 8), (128, 2), (128, 4), (256, 4)):
        triton_explog.TUNING.update(block_v=block_v, num_warps=warps)
        try:
            ms = measure("triton", dtype, channels_last, rep=50)["ms"]
        except Exception as error:  # a configuration that does not compile or fit
            ms = float("nan")
            print(f"  block_v {block_v} warps {warps}: {error}")
        rows.append({"block_v": block_v, "num_warps": warps, "ms": ms})
        print(f"  tune {dtype} cl={channels_last} block_v {block_v} warps {warps}: {ms:.3f} ms")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    bandwidth = copy_bandwidth()
    print(f"{env}\ncopy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    results = {"environment": env, "shape": list(SHAPE), "copy_bandwidth_Bps": bandwidth, "cases": [], "tuning": {}}
    default_tuning = dict(triton_explog.TUNING)
    best_by_layout = {}
    for dtype in (torch.bfloat16, torch.float32):
        for channels_last in (False, True):
            key = f"{str(dtype).removeprefix('torch.')}-{'cl3d' if channels_last else 'ncdhw'}"
            if dtype == torch.bfloat16:  # sweep once per layout (compiles cost device time)
                sweep = tune_triton(dtype, channels_last)
                best = min((r for r in sweep if r["ms"] == r["ms"]), key=lambda r: r["ms"])
                results["tuning"][key] = {"sweep": sweep, "best": best}
                best_by_layout[channels_last] = best
            best = best_by_layout[channels_last]
            triton_explog.TUNING.update(block_v=best["block_v"], num_warps=best["num_warps"])
            variants = ["eager", "native", "triton"] + (["compile"] if dtype == torch.bfloat16 else [])
            measured = {v: measure(v, dtype, channels_last) for v in variants}
            triton_explog.TUNING.update(default_tuning)
            ref = measured["eager"]["grad"]
            for variant, m in measured.items():
                err = float((m["grad"] - ref).norm() / ref.norm())
                row = {
                    "case": key,
                    "variant": variant,
                    "ms": m["ms"],
                    "peak_extra_MiB": m["peak_extra_bytes"] / 2**20,
                    # beyond the gradient itself, which every backend must produce
                    "working_MiB": (m["peak_extra_bytes"] - m["grad"].numel() * dtype.itemsize) / 2**20,
                    "floor_ms": floor_ms(dtype, bandwidth),
                    "grad_rel_err_vs_eager": err,
                }
                results["cases"].append(row)
                print(row)
    (args.out / "gpu_loss.json").write_text(json.dumps(results, indent=2))
    (args.out / "gpu_loss.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"Loss forward + backward at {tuple(results['shape'])}, {env['card']}, torch {env['torch']}, "
        f"Triton {env['triton']}, CUDA {env['cuda']}; copy bandwidth "
        f"{results['copy_bandwidth_Bps'] / 1e12:.2f} TB/s (read + write).",
        "",
        "| case | variant | ms (median) | x floor | speedup vs eager | speedup vs compile | peak extra MiB | "
        "working MiB (extra - grad) | working vs eager | grad rel err vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_case: dict[str, dict[str, dict]] = {}
    for row in results["cases"]:
        by_case.setdefault(row["case"], {})[row["variant"]] = row
    for case, rows in by_case.items():
        eager, compiled = rows["eager"], rows.get("compile")
        for variant, row in rows.items():
            vs_compile = f"{compiled['ms'] / row['ms']:.2f}" if compiled else "-"
            lines.append(
                f"| {case} | {variant} | {row['ms']:.3f} | {row['ms'] / row['floor_ms']:.2f} | "
                f"{eager['ms'] / row['ms']:.1f} | {vs_compile} | {row['peak_extra_MiB']:.1f} | "
                f"{row['working_MiB']:.1f} | {row['working_MiB'] / eager['working_MiB']:.4f} | "
                f"{row['grad_rel_err_vs_eager']:.1e} |"
            )
    lines += ["", "Triton launch configuration (best of the sweep):", ""]
    for case, tuning in results["tuning"].items():
        best = tuning["best"]
        lines.append(f"- {case}: block_v {best['block_v']}, num_warps {best['num_warps']}: {best['ms']:.3f} ms")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
