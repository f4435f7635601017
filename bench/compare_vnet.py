"""Our network vs V-Net: parameters, forward latency per volume, peak memory and bf16 agreement with fp32.

python -m bench.compare_vnet [--device cpu|cuda] [--size N] [--repeats R] [--out DIR]
Variants, same run, same weights: eager fp32 (the baseline), bf16 autocast, bf16 + channels-last, and
on CUDA the Predictor (bf16 + channels-last + CUDA graph). Each reduced-precision variant's prediction
is compared with fp32's on the same input (argmax agreement %, max softmax difference, relative L2 error
of the logits): one cuDNN release computes bf16 conv3d wrongly (PyTorch issue 163539), so the fast path
proves itself on the card it is timed on. Peak memory: on CUDA the growth of max_memory_allocated over
the first two calls of a built predictor (a CUDA graph's capture and private pool included); on the CPU
the growth of the peak resident set over one forward, measured in a fresh process (Linux:
/proc/self/clear_refs resets the peak). Prints one markdown table (and writes it
with a JSON to DIR).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from bench.cpu_memory import reset_peak_kib, status_kib
from bench.outputs import write_outputs
from bench.timing import elapsed_ms, median_ms
from expseg_fast.inference.predictor import Predictor
from expseg_fast.machine import cpu_bf16_units
from expseg_fast.models import ExpLogNet, NetConfig, VNet, count_parameters

ROOT = Path(__file__).parents[1]  # the worker runs as `python -m bench.compare_vnet` from there

NETWORKS = {"ours": lambda: ExpLogNet(NetConfig(num_labels=20)), "vnet": lambda: VNet(num_labels=20)}
VARIANTS = {  # name -> (precision, channels_last, CUDA graph, BatchNorm folded, torch.compile)
    "eager fp32": ("fp32", False, False, False, False),
    "bf16 autocast": ("bf16", False, False, False, False),
    "bf16 + channels-last": ("bf16", True, False, False, False),
    "Predictor (bf16 + channels-last + CUDA graph)": ("bf16", True, True, False, False),
    "folded BN (bf16 + channels-last)": ("bf16", True, False, True, False),
    "compiled (bf16 + channels-last)": ("bf16", True, False, False, True),
    "folded + compiled + CUDA graph (bf16 + channels-last)": ("bf16", True, True, True, True),
}
BASELINE = "eager fp32"


def variants_for(device: str, compiled: bool = True) -> list[str]:
    """The variants that exist on a device (a CUDA graph needs CUDA; bf16 on a CPU only where it multiplies
    bf16 natively: emulated, one call takes seconds), the torch.compile ones if `compiled`."""
    bf16 = device == "cuda" or bool(cpu_bf16_units())
    return [v for v, (precision, _, graph, _, comp) in VARIANTS.items()
            if (device == "cuda" or not graph) and (compiled or not comp) and (bf16 or precision != "bf16")]


def build(network: str, device: str, variant: str, size: int) -> Predictor:
    """The Predictor of a freshly seeded network (the same weights for every variant) for one size^3 volume."""
    torch.manual_seed(0)
    model = NETWORKS[network]().to(device).eval()
    precision, channels_last, graph, fold, compiled = VARIANTS[variant]
    shape = (1, 1, size, size, size)
    return Predictor(model, shape, precision=precision, channels_last=channels_last, cuda_graph=graph, fold_bn=fold,
                     compiled=compiled)


def agreement(network: str, device: str, variant: str, size: int) -> dict:
    """How far a variant's prediction is from eager fp32's on the same input."""
    image = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    outputs = {}
    for name in (BASELINE, variant):
        predictor = build(network, device, name, size)
        logits = predictor.logits(image).float().clone()
        outputs[name] = (logits, logits.argmax(1), torch.softmax(logits, 1))
    (z0, a0, p0), (z1, a1, p1) = outputs[BASELINE], outputs[variant]
    return {"argmax_agreement_pct": 100 * float((a0 == a1).float().mean()),
            "max_prob_diff": float((p0 - p1).abs().max()),
            "logits_rel_err": float((z1 - z0).norm() / z0.norm())}


def latency_ms(network: str, device: str, variant: str, size: int, repeats: int) -> tuple[float, float]:
    """(median ms per call after warm-up, seconds of the first call: compilation, graph capture, autotuning)."""
    predictor = build(network, device, variant, size)
    image = torch.randn(predictor.input_shape, device=device)
    first_s = elapsed_ms(lambda: predictor.logits(image), device) / 1e3
    return median_ms(lambda: predictor.logits(image), repeats, warmup=1, device=device), first_s


def peak_mib(network: str, device: str, variant: str, size: int) -> float:
    """Peak memory of inference beyond the weights and the input: on CUDA over two calls (so a CUDA
    graph's capture and private pool count), on the CPU over one forward."""
    if device == "cpu" and VARIANTS[variant][4]:  # a compiled variant: its compilation would dominate the count
        return float("nan")
    if device == "cpu":  # the peak resident set only grows: measure in a fresh process
        out = subprocess.run(
            [sys.executable, "-m", "bench.compare_vnet", "--worker", network, variant, str(size)], cwd=ROOT,
            check=True, capture_output=True, text=True,
        )
        return float(out.stdout.strip().splitlines()[-1])
    predictor = build(network, device, variant, size)  # its own copy of the weights, allocated before the count
    image = torch.randn(predictor.input_shape, device=device)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(2):  # the first call captures the CUDA graph
        predictor.logits(image)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _worker(network: str, variant: str, size: int) -> None:
    predictor = build(network, "cpu", variant, size)
    image = torch.randn(predictor.input_shape)
    before = reset_peak_kib()
    predictor.logits(image)
    print((status_kib("VmHWM") - before) / 1024.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=None, help="cube edge (default 128 on CUDA, 64 on the CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants (the CPU "
                        "rehearsal: minutes of compilation; tests/test_graph_options.py checks those paths)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    size = args.size or (128 if args.device == "cuda" else 64)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest algorithms (all variants)
    if size % 16:
        parser.error(f"--size must be a multiple of 16 (V-Net halves four times), got {size}")
    rows = []
    for network in NETWORKS:
        params = count_parameters(NETWORKS[network]())
        for variant in variants_for(args.device, not args.no_compile):
            ms, first_s = latency_ms(network, args.device, variant, size, args.repeats)
            row = {"network": network, "variant": variant, "params": params, "ms": ms, "first_call_s": first_s,
                   "peak_MiB": peak_mib(network, args.device, variant, size)}
            if variant != BASELINE:
                row.update(agreement(network, args.device, variant, size))
            rows.append(row)
            print(rows[-1], flush=True)
    table = markdown(rows, args.device, size)
    print(table)
    if args.out:
        write_outputs(args.out, f"compare_vnet_{args.device}", rows, table)


def markdown(rows: list[dict], device: str, size: int) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    versions = f"torch {torch.__version__}"
    if device == "cuda":
        versions += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    lines = [
        f"Forward per volume at {size}^3, batch 1, {name}, {versions}",
        "",
        "| network | variant | parameters | ms (median) | x faster than eager fp32 | peak MiB | argmax = fp32 % | "
        "max softmax diff | logits rel err | first call s (compile, capture) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["network"]: r for r in rows if r["variant"] == BASELINE}
    for r in rows:
        agree = (f"{r['argmax_agreement_pct']:.2f} | {r['max_prob_diff']:.1e} | {r['logits_rel_err']:.1e}"
                 if "argmax_agreement_pct" in r else "- | - | -")
        lines.append(f"| {r['network']} | {r['variant']} | {r['params'] / 1e6:.2f} M | {r['ms']:.2f} | "
                     f"{base[r['network']]['ms'] / r['ms']:.2f} | {r['peak_MiB']:.0f} | {agree} | "
                     f"{r.get('first_call_s', float('nan')):.1f} |")
    ours = {r["variant"]: r for r in rows if r["network"] == "ours"}
    vnet = {r["variant"]: r for r in rows if r["network"] == "vnet"}
    lines.append("")
    for variant, r in ours.items():
        lines.append(f"- {variant}: V-Net / ours latency {vnet[variant]['ms'] / r['ms']:.2f}x")
    lines.append(f"- parameters V-Net / ours: {vnet[BASELINE]['params'] / ours[BASELINE]['params']:.1f}x")
    if device == "cpu" and not cpu_bf16_units():
        lines.append("- the bf16 variants are left out: this CPU does not multiply bf16 natively")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
