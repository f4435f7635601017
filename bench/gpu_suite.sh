#!/usr/bin/env bash
# The GPU suite: one device call (under 8 minutes) on a fresh GPU machine. Builds the CUDA extension,
# runs the CUDA-marked tests, benchmarks the loss backends against the
# eager reference and torch.compile in the same run, compares our network with V-Net (eager fp32 vs
# bf16 + channels-last + CUDA graph), measures a training step's time and peak memory (eager fp32 vs the
# engine, both deep-supervision settings, and under a 12 GB cap), and writes logs, JSON and markdown
# tables to $OUT.
# Usage (from the repository root): OUT=/some/dir bash bench/gpu_suite.sh
# Pure-Python wheels missing on the machine may be carried in .whl/ (see bench/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ! python3 -c "import mpmath, nibabel" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/card.txt"

start=$(date +%s)
if ! MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 EXPSEG_FAST_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"

# Each step has its own time limit (seconds), so one slow step cannot keep the later ones, and the
# call, from running: the whole stays under 8 minutes after the build.
step() {  # step NAME LIMIT COMMAND...: runs COMMAND with a time limit, logs to $OUT/NAME.log
  local name=$1 limit=$2 begin rc
  shift 2
  begin=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -25 "$OUT/$name.log"
  echo "== $name: $(( $(date +%s) - begin )) s, exit $rc$([ "$rc" = 124 ] && echo ' (time limit)')"
  return "$rc"
}
# SUITE_TESTS narrows or widens the tests (default: the CUDA-marked ones; CI runs the others).
step pytest 150 python3 -m pytest ${SUITE_TESTS:-tests bench -m cuda} -q -p no:cacheprovider --maxfail=20
tests_rc=$?
step compare_vnet 60 python3 bench/compare_vnet.py --device cuda --out "$OUT"
step train_step 75 python3 bench/train_step.py --device cuda --out "$OUT"
step gpu_loss 150 python3 bench/gpu_loss.py --out "$OUT"
exit "$tests_rc"
