#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu for sm_80 and sm_90 against the installed torch's headers, with no GPU,
# so that a compile error never costs a GPU window its first call. Exits non-zero on any error, and on
# any warning in the project's own sources (csrc/); warnings inside torch's headers are not ours.
#
# Needs nvcc (this project's machines have CUDA 13 at /usr/local/cuda; NVCC=... picks another). A CPU
# build of torch ships ATen/c10's CUDA headers but not the generated c10/cuda/impl/cuda_cmake_macros.h,
# which is supplied here in a temporary folder (one define, as a CUDA build generates it), and nothing
# that includes cuSPARSE/cuBLAS (the sources use c10/cuda only). Takes about 40 s per file and arch on
# the 2-core machine (bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
command -v "$NVCC" > /dev/null || { echo "cuda_compile_check: $NVCC not found" >&2; exit 2; }
stub=$(mktemp -d)
out=$(mktemp -d)
trap 'rm -rf "$stub" "$out"' EXIT
mkdir -p "$stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
torch_dir=$(python -c "import os, torch; print(os.path.dirname(torch.__file__))")
py_include=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
status=0
for cu in csrc/cuda/*.cu; do
  for arch in 80 90; do
    log="$out/$(basename "$cu" .cu)-sm$arch.log"
    start=$SECONDS
    if ! "$NVCC" -c "$cu" -o "$out/$(basename "$cu" .cu)-sm$arch.o" -std=c++17 -O3 \
        -gencode "arch=compute_$arch,code=sm_$arch" --expt-relaxed-constexpr -Xcompiler -fPIC \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
        -D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1 \
        -I"$stub" -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" -I"$py_include" \
        > "$log" 2>&1; then
      echo "FAIL $cu sm_$arch:"; grep -E "error" "$log" | head -20; status=1; continue
    fi
    ours=$(grep -E "csrc/[^ :(]*(\([0-9]+\):|:[0-9]+:[0-9]+:) *warning" "$log" || true)
    if [ -n "$ours" ]; then
      echo "WARN $cu sm_$arch:"; echo "$ours" | head -20; status=1; continue
    fi
    echo "ok   $cu sm_$arch ($((SECONDS - start)) s)"
  done
done
exit $status
