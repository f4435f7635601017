"""Our network vs V-Net: parameters, forward latency per volume and peak memory, eager fp32 vs optimized.

python bench/compare_vnet.py [--device cpu|cuda] [--size N] [--repeats R] [--out DIR]
Optimized = the Predictor with bf16 + channels-last + CUDA graph on a GPU; on the CPU, the fastest of
fp32, fp32 channels-last and bf16 autocast, measured here per network. Peak memory: on CUDA the growth of
max_memory_allocated from building the predictor through two calls, less the weights and the input
(a CUDA graph's capture and private pool included); on the CPU the growth of the peak resident set over one forward,
measured in a fresh process (Linux: /proc/self/clear_refs resets the peak). Prints one markdown table (and writes it with a JSON to DIR).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from expseg_fast.infer import Predictor
from expseg_fast.models import ExpLogNet, NetConfig, VNet, count_parameters

NETWORKS = {"ours": lambda: ExpLogNet(NetConfig(num_labels=20)), "vnet": lambda: VNet(num_labels=20)}
SETTINGS = {  # name -> (precision, channels_last)
    "fp32": ("fp32", False),
    "fp32-cl": ("fp32", True),
    "bf16-cl": ("bf16", True),
}


def build(network: str, device: str, setting: str, size: int, graph: bool) -> Predictor:
    """The Predictor of a freshly seeded network for one (size^3) volume in one setting."""
    torch.manual_seed(0)
    model = NETWORKS[network]().to(device).eval()
    precision, channels_last = SETTINGS[setting]
    shape = (1, 1, size, size, size)
    return Predictor(model, shape, precision=precision, channels_last=channels_last, cuda_graph=graph)


def latency_ms(network: str, device: str, setting: str, size: int, repeats: int, graph: bool) -> float:
    predictor = build(network, device, setting, size, graph)
    image = torch.randn(predictor.input_shape, device=device)
    times = []
    for i in range(repeats + 2):  # two warm-ups (graph capture, autotuning)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        predictor.logits(image)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mib(network: str, device: str, setting: str, size: int, graph: bool) -> float:
    """Peak memory of inference beyond the weights: on CUDA over building the predictor and two calls
    (so a CUDA graph's capture and private pool count), on the CPU over one forward."""
    if device == "cpu":  # the peak resident set only grows: measure in a fresh process
        out = subprocess.run(
            [sys.executable, __file__, "--worker", network, setting, str(size)],
            check=True, capture_output=True, text=True,
        )
        return float(out.stdout.strip().splitlines()[-1])
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    predictor = build(network, device, setting, size, graph)
    weights = sum(p.numel() * p.element_size() for p in predictor.model.parameters())
    image = torch.randn(predictor.input_shape, device=device)
    for _ in range(2):
        predictor.logits(image)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base - weights - image.numel() * image.element_size()) / 2**20


def _worker(network: str, setting: str, size: int) -> None:
    predictor = build(network, "cpu", setting, size, graph=False)
    image = torch.randn(predictor.input_shape)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to now
    before = _status_kib("VmRSS")
    predictor.logits(image)
    print((_status_kib("VmHWM") - before) / 1024.0)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=None, help="cube edge (default 128 on CUDA, 64 on the CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
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
        if args.device == "cuda":
            variants = {"eager fp32": ("fp32", False), "bf16 + channels-last + CUDA graph": ("bf16-cl", True)}
        else:
            timed = {s: latency_ms(network, "cpu", s, size, args.repeats, False) for s in SETTINGS}
            fastest = min(timed, key=timed.get)
            variants = {"eager fp32": ("fp32", False), f"fastest CPU setting ({fastest})": (fastest, False)}
        for label, (setting, graph) in variants.items():
            ms = latency_ms(network, args.device, setting, size, args.repeats, graph)
            mib = peak_mib(network, args.device, setting, size, graph)
            rows.append({"network": network, "variant": label, "params": params, "ms": ms, "peak_MiB": mib})
            print(rows[-1], flush=True)
    table = markdown(rows, args.device, size)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"compare_vnet_{args.device}.md").write_text(table)
        (args.out / f"compare_vnet_{args.device}.json").write_text(json.dumps(rows, indent=2))


def markdown(rows: list[dict], device: str, size: int) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    lines = [
        f"Forward per volume at {size}^3, batch 1, {name}, torch {torch.__version__}",
        "",
        "| network | variant | parameters | ms (median) | peak MiB |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['network']} | {r['variant']} | {r['params'] / 1e6:.2f} M | {r['ms']:.1f} | {r['peak_MiB']:.0f} |" for r in rows]
    ours = {r["variant"].split(" (")[0]: r for r in rows if r["network"] == "ours"}
    vnet = {r["variant"].split(" (")[0]: r for r in rows if r["network"] == "vnet"}
    lines.append("")
    for variant, r in ours.items():
        lines.append(f"- {variant}: V-Net / ours latency {vnet[variant]['ms'] / r['ms']:.2f}x")
    lines.append(f"- parameters V-Net / ours: {rows[-1]['params'] / rows[0]['params']:.1f}x")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
