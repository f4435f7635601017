"""GPU benchmark of the loss: forward + backward at (1, 20, 128^3), every backend, same run, same card.

python -m bench.gpu_loss --out DIR [--smoke]
Measures the device-to-device copy bandwidth (the DRAM ceiling), then for fp32 and bf16 logits in both
layouts: median time (triton.testing.do_bench) and peak extra memory of forward + backward for the
eager reference, torch.compile(reference) (bf16 only: compiles cost device time), the native CUDA op
and the Triton kernels. First, per layout (bf16), the forward and backward phases alone: the native op
and each Triton design x launch configuration (checked against the native op); the fastest per kernel
is then used for the end-to-end rows. Writes gpu_loss.json and gpu_loss.md (card, driver, torch and
Triton versions) to DIR. --smoke runs the same code on the CPU (Triton interpreter, a tiny shape,
wall-clock timing, no compile variant): the GPU suite's CI rehearsal, whose figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from bench.timing import elapsed_ms
from expseg_fast.kernels import explog as triton_explog
from expseg_fast.losses import LossSpec, loss
from expseg_fast.losses.reference import reference_loss

SHAPE = (1, 20, 128, 128, 128)
DEVICE = "cuda"  # the smoke test (bench/test_gpu_loss_smoke.py) runs the sweep logic on the CPU
SPEC = LossSpec()


def environment() -> dict:
    smi = "cpu (smoke)" if DEVICE == "cpu" else subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()
    return {"card": smi, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}


def wall_clock_ms(fn, **_) -> float:
    """do_bench's stand-in on the CPU: one call, wall clock."""
    return elapsed_ms(fn)


def smoke() -> None:
    """Switches the module to the CPU rehearsal: interpreter, tiny shape, two configurations."""
    global DEVICE, SHAPE, SWEEP, do_bench
    DEVICE, SHAPE, do_bench = "cpu", (1, 5, 4, 5, 6), wall_clock_ms
    SWEEP = {"tiles": ((64, 2),), "rows": ((128, 1),)}


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (2 MiB in the rehearsal)."""
    x = torch.randn(2**29 if DEVICE == "cuda" else 2**19, device=DEVICE)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def inputs(dtype: torch.dtype, channels_last: bool):
    torch.manual_seed(0)
    logits = (2 * torch.randn(SHAPE, device=DEVICE)).to(dtype)
    if channels_last:
        logits = logits.to(memory_format=torch.channels_last_3d)
    # uint8 labels, as the trainer passes them (from the cache to the loss)
    target = torch.randint(0, SHAPE[1], (SHAPE[0], *SHAPE[2:]), device=DEVICE, dtype=torch.uint8)
    weights = torch.rand(SHAPE[1], device=DEVICE) + 0.5
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
    if DEVICE == "cpu":  # the rehearsal: no device memory to measure
        return {"ms": do_bench(step), "peak_extra_bytes": float("nan"), "grad": logits.grad.float()}
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
    """Logits read twice, target (uint8) read twice, gradient written once, at the copy bandwidth."""
    n, c = SHAPE[:2]
    voxels = n * SHAPE[2] * SHAPE[3] * SHAPE[4]
    size = torch.tensor([], dtype=dtype).element_size()
    return (3 * n * c * voxels * size + 2 * voxels * 1) / bandwidth * 1e3


# Per kernel and design, the (voxels per program, warps) configurations swept: the H100 sweeps'
# best tiles configurations, and the row design's spill-free ones (bench/triton_static.py).
SWEEP = {"tiles": ((64, 2), (128, 2), (64, 8), (128, 4)), "rows": ((128, 1), (256, 2), (256, 4), (512, 4))}


def phase_times(dtype: torch.dtype, channels_last: bool) -> dict:
    """Forward (statistics + finalize) and backward (gradient) alone, for the native op and every
    Triton design x configuration, with each configuration's loss and gradient checked against the
    native op's. Returns {"native": {...}, "stats": [rows], "grad": [rows]}."""
    logits, target, weights = inputs(dtype, channels_last)
    logits = logits.detach()
    args = SPEC.op_args()
    one = torch.ones((), device=DEVICE)
    loss_n, stats_n, _ = torch.ops.expseg_fast.explog_forward(logits, target, weights, *args)
    grad_n = torch.ops.expseg_fast.explog_backward(one, logits, target, weights, stats_n, *args)
    bench = lambda fn: do_bench(fn, warmup=10, rep=40, return_mode="median")  # noqa: E731
    out = {"native": {
        "forward_ms": bench(lambda: torch.ops.expseg_fast.explog_forward(logits, target, weights, *args)),
        "backward_ms": bench(lambda: torch.ops.expseg_fast.explog_backward(one, logits, target, weights, stats_n,
                                                                            *args)),
    }, "stats": [], "grad": []}
    tiles = {"design": "tiles"}
    triton_explog.TUNING.update(stats=tiles, grad=tiles)
    _, stats_t, _ = triton_explog.explog_forward(logits, target, weights, *args, False)
    for design, configs in SWEEP.items():
        for block_v, warps in configs:
            chosen = {"design": design, "block_v": block_v, "num_warps": warps}
            row = dict(chosen)
            try:
                triton_explog.TUNING.update(stats=chosen, grad=tiles)
                loss_t, _, _ = triton_explog.explog_forward(logits, target, weights, *args, False)
                row["loss_rel_err"] = abs(float(loss_t) - float(loss_n)) / abs(float(loss_n))
                row["ms"] = bench(lambda: triton_explog.explog_forward(logits, target, weights, *args, False))
                out["stats"].append(row)
                row = dict(chosen)
                triton_explog.TUNING.update(stats=tiles, grad=chosen)
                grad_t = triton_explog.explog_backward(one, logits, target, weights, stats_t, *args, False)
                row["grad_rel_err"] = float((grad_t.float() - grad_n.float()).norm() / grad_n.float().norm())
                row["ms"] = bench(lambda: triton_explog.explog_backward(one, logits, target, weights, stats_t, *args,
                                                                           False))
                out["grad"].append(row)
            except Exception as error:  # a configuration that does not compile or fit
                print(f"  {chosen}: {type(error).__name__}: {error}")
    triton_explog.TUNING.update(stats=None, grad=None)
    for kind in ("stats", "grad"):
        for row in out[kind]:
            print(f"  {kind} {dtype} cl={channels_last} {row}")
    print(f"  native {out['native']}")
    return out


def best(rows: list[dict], error_key: str, tolerance: float) -> dict:
    """The fastest configuration whose result agrees with the native op's."""
    good = [r for r in rows if r.get(error_key, 1.0) <= tolerance]
    pick = min(good, key=lambda r: r["ms"])
    return {"design": pick["design"], "block_v": pick["block_v"], "num_warps": pick["num_warps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="the CPU rehearsal (interpreter, tiny shape)")
    args = parser.parse_args()
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":  # Triton reads it at import: start again
        os.execve(sys.executable, [sys.executable, "-m", "bench.gpu_loss", *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    if args.smoke:
        smoke()
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    bandwidth = copy_bandwidth()
    print(f"{env}\ncopy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    results = {"environment": env, "shape": list(SHAPE), "copy_bandwidth_Bps": bandwidth, "cases": [], "tuning": {}}
    chosen_by_layout = {}
    for dtype in (torch.bfloat16, torch.float32):
        for channels_last in (False, True):
            key = f"{str(dtype).removeprefix('torch.')}-{'cl3d' if channels_last else 'ncdhw'}"
            if dtype == torch.bfloat16:  # sweep once per layout (compiles cost device time)
                phases = phase_times(dtype, channels_last)
                chosen = {"stats": best(phases["stats"], "loss_rel_err", 1e-4),
                          "grad": best(phases["grad"], "grad_rel_err", 1e-2)}
                results["tuning"][key] = {**phases, "chosen": chosen}
                chosen_by_layout[channels_last] = chosen
            triton_explog.TUNING.update(chosen_by_layout[channels_last])
            compile_too = dtype == torch.bfloat16 and DEVICE == "cuda"  # compiles cost time
            variants = ["eager", "native", "triton"] + (["compile"] if compile_too else [])
            measured = {v: measure(v, dtype, channels_last) for v in variants}
            triton_explog.TUNING.update(stats=None, grad=None)
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
            # written after every case: a run stopped by the suite's time limit keeps what it measured
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
    lines += ["", "Forward (statistics + finalize) and backward (gradient) alone, ms (median), bf16:", "",
              "| layout | kernel | native | " + " | ".join(f"{d} {b}x{w}" for d, c in SWEEP.items() for b, w in c)
              + " | chosen |", "|---|---|---|" + "---|" * (sum(len(c) for c in SWEEP.values()) + 1)]
    for case, tuning in results["tuning"].items():
        for kind, native_key in (("stats", "forward_ms"), ("grad", "backward_ms")):
            times = {(r["design"], r["block_v"], r["num_warps"]): r["ms"] for r in tuning[kind]}
            cells = [f"{times[(d, b, w)]:.3f}" if (d, b, w) in times else "-" for d, c in SWEEP.items() for b, w in c]
            chosen = tuning["chosen"][kind]
            lines.append(f"| {case} | {kind} | {tuning['native'][native_key]:.3f} | " + " | ".join(cells)
                         + f" | {chosen['design']} {chosen['block_v']}x{chosen['num_warps']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
