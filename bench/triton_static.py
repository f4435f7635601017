"""Static profile of the Triton loss kernels, compiled for a GPU without one (no timings).

python -m bench.triton_static [--arch 90] [--out DIR]
Compiles the statistics and gradient kernels of both designs ("tiles", "rows") at (1, 20, 128^3) bf16
for the given architecture with the specialisation a real launch gets (integer arguments equal to 1
become constants, multiples of 16 are marked divisible by 16, pointers 16-byte aligned), then reads the
cubin with the tools Triton ships (cuobjdump, nvdisasm): registers per thread, spilled bytes (stack),
shared memory, and counts of the SASS instructions that decide a memory-bound kernel's speed — global
loads/stores by width, warp shuffles, barriers, special-function (exp/log) instructions. These explain
GPU timings and rank candidate configurations before a device session; they are not timings.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from expseg_fast.kernels import explog

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
C, D = 20, 128
V = D**3
CONFIGS = {"tiles": ((64, 2), (128, 2), (128, 4), (256, 4)),
           "rows": ((128, 1), (256, 2), (256, 4), (512, 4), (1024, 4))}


def strides(channels_last: bool) -> dict:
    """Logits (N, C, D, H, W) and int64 target (N, D, H, W) strides at (1, C, D, D, D)."""
    z = dict(szn=C * V, szc=1, szd=D * D * C, szh=D * C, szw=C) if channels_last else \
        dict(szn=C * V, szc=V, szd=D * D, szh=D, szw=1)
    return {**z, "stn": V, "std": D * D, "sth": D, "stw": 1, "V": V, "H": D, "W": D}


def specialise(fn, values: dict, pointers: dict, constants: dict) -> ASTSource:
    """The ASTSource a launch with these argument values compiles (Triton's integer specialisation)."""
    signature, attrs, constexprs = {}, {}, dict(constants)
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
        elif isinstance(values[name], float):
            signature[name] = "fp32"
        elif values[name] == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(values[name]) >= 2**31 else "i32"
            if values[name] % 16 == 0:
                attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def sass_profile(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([BIN / "cuobjdump", "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([BIN / "nvdisasm", "-c", path], capture_output=True, text=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        found = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if found:
            ops[found.group(1)] += 1
    count = lambda prefix: sum(n for op, n in ops.items() if op.startswith(prefix))  # noqa: E731
    number = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))  # noqa: E731
    return {
        "registers": number("REG"), "spill_bytes": number("STACK"), "shared_bytes": number("SHARED"),
        "instructions": sum(ops.values()), "SHFL": count("SHFL"), "BAR": count("BAR"), "MUFU": count("MUFU"),
        "loads": {op: n for op, n in sorted(ops.items()) if op.startswith("LDG")},
        "stores": {op: n for op, n in sorted(ops.items()) if op.startswith("STG")},
    }


def compile_kernel(fn, channels_last: bool, block_v: int, warps: int, arch: int, extra: dict) -> dict:
    values = {**strides(channels_last), "n_tiles": V // block_v, "gamma_cross": 0.3,
              "sgn": C * V, "sgc": 1 if channels_last else V, "sgd": strides(channels_last)["szd"],
              "sgh": strides(channels_last)["szh"], "sgw": strides(channels_last)["szw"]}
    pointers = {"z_ptr": "*bf16", "lab_ptr": "*i64", "part_ptr": "*fp64", "bad_ptr": "*i32", "g_ptr": "*bf16",
                "coef_ptr": "*fp32", "gout_ptr": "*fp32"}
    packed = dict(FLAT_Z=True, PACKED_Z=channels_last, FLAT_T=True, FLAT_G=True, PACKED_G=channels_last)
    constants = {k: v for k, v in {**packed, **extra, "C": C, "BLOCK_C": 32, "BLOCK_V": block_v}.items()
                 if k in fn.arg_names}
    source = specialise(fn, {k: v for k, v in values.items() if k in fn.arg_names},
                        {k: v for k, v in pointers.items() if k in fn.arg_names}, constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    return sass_profile(kernel.asm["cubin"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for design, configs in CONFIGS.items():
        rows_design = design == "rows"
        kernels = {"stats": explog._stats_rows_kernel if rows_design else explog._stats_kernel,
                   "grad": explog._grad_rows_kernel if rows_design else explog._grad_kernel}
        for layout in ("ncdhw", "cl3d"):
            for block_v, warps in configs:
                for kind, fn in kernels.items():
                    extra = {"NEED_CROSS": True, "DETERMINISTIC": False}
                    profile = compile_kernel(fn, layout == "cl3d", block_v, warps, args.arch, extra)
                    row = {"design": design, "kernel": kind, "layout": layout, "block_v": block_v,
                           "num_warps": warps, **profile}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    text = markdown(rows, args.arch)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "triton_static.json").write_text(json.dumps(rows, indent=1))
        (args.out / "triton_static.md").write_text(text)


def markdown(rows: list[dict], arch: int) -> str:
    lines = [f"Triton {triton.__version__}, sm_{arch}, (1, {C}, {D}^3) bf16 logits, int64 target; static counts "
             "of the whole kernel (loop bodies counted once).", "",
             "| design | kernel | layout | block_v x warps | regs | spill B | SHFL | BAR | MUFU | loads | stores |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda d: ", ".join(f"{k.removeprefix('LDG.E').removeprefix('STG.E') or '.32'} x{n}"  # noqa: E731
                                  for k, n in d.items()) or "-"
        lines.append(f"| {r['design']} | {r['kernel']} | {r['layout']} | {r['block_v']} x {r['num_warps']} | "
                     f"{r['registers']} | {r['spill_bytes']} | {r['SHFL']} | {r['BAR']} | {r['MUFU']} | "
                     f"{fmt(r['loads'])} | {fmt(r['stores'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
