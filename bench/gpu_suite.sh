#!/usr/bin/env bash
# The GPU suite: the engine measured on a fresh GPU machine, in few device calls (bench/README.md has the
# plan for a 15-minute window). Builds the CUDA extension, then runs the chosen parts, each under its own
# time limit so that one slow part cannot starve the others:
#   tests      the CUDA-marked tests
#   inference  bench/compare_vnet.py: ours vs V-Net, eager fp32 / bf16 / bf16 + channels-last / CUDA graph
#   train_step bench/train_step.py: eager fp32 vs the engine, time and peak memory, the 12 GB cap
#   loss       bench/gpu_loss.py: every loss backend and Triton design, bf16 and fp32, both layouts
#   norm       bench/norm_step.py: the fused instance norm + ReLU, GroupNorm + ReLU and BatchNorm + ReLU,
#              forward + backward, against the memory floor at the copy bandwidth measured in the same run
#   synth      bench/synth_step.py: the label-map generator's time per example against the training step
#   nnunet     bench/nnunet_step.py: nnU-Net's 3d_fullres step with its default loss and with L_Exp (the fused op)
#   paper      the paper preset of Table 1 on split 0 (scripts/reproduce_table1.py), cases concurrently
#              on the card, with the epoch profile (data / augment / step / validation / report seconds)
#   real_scans bench/real_scans_run.py: the generator's synth-paper preset trained until the part's deadline
#              (resumed on a warm machine), then scored on Colin27/AAL and the sets of SUITE_REAL_SCANS
# Usage (from the repository root):
#   OUT=/some/dir bash bench/gpu_suite.sh [PART ...]        default: every part but tests
#   OUT=/some/dir bash bench/gpu_suite.sh --smoke [PART ...] the CPU rehearsal that CI runs: the same
#       scripts at tiny sizes without their torch.compile rows, Triton under the interpreter, the tests only collected, Table 1's `smoke`
#       preset (one epoch of two subjects at 32^3). Its figures mean nothing; it proves the calls work.
# Environment: PYTHON the interpreter (default python3); LIMIT_<PART> (seconds) overrides a part's limit;
# PAPER_CASES the Table 1 cases of the paper part (default all seven; L_Exp(0.3) first); SUITE_TESTS the
# test selection of `tests`;
# REAL_SCANS_TRAIN further scripts/train.py options of the real_scans part (e.g. "--epochs 60": a poly
# schedule that ends within the window); SUITE_REAL_SCANS more labelled sets it scores, "NAME=FOLDER=MAP ...".
# Colin27 travels as .realscans/colin27 (bench/carry_scans.sh), where the machine lacks mricron-data.
# Everything lands in $OUT/suite.tar.gz (re-packed after every part, so a call stopped at its limit keeps
# what it measured) and $OUT/summary.md, which is also printed last. The device returns at most 8 files.
# Pure-Python wheels the GPU machine lacks travel in .whl/ (bench/fetch_wheels.sh fetches them).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
PARTS="${*:-inference train_step loss norm synth nnunet paper real_scans}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
STAGE="$(mktemp -d)"
export PYTHON="${PYTHON:-python3}"  # the interpreter of every part (the CI rehearsal passes its own)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

pack() {  # everything measured so far -> $OUT/suite.tar.gz and $OUT/summary.md
  tar czf "$OUT/suite.tar.gz.tmp" -C "$STAGE" . && mv "$OUT/suite.tar.gz.tmp" "$OUT/suite.tar.gz"
  cat "$STAGE/card.txt" "$STAGE"/*.md "$STAGE"/table1-*/table1.md "$STAGE/steps.txt" > "$OUT/summary.md" 2> /dev/null
}
step() {  # step NAME LIMIT COMMAND...: runs COMMAND under a time limit, logs to $STAGE/NAME.log
  local name=$1 limit=$2 begin rc
  shift 2
  begin=$(date +%s)
  timeout "$limit" "$@" > "$STAGE/$name.log" 2>&1
  rc=$?
  tail -15 "$STAGE/$name.log"
  echo "== $name: $(( $(date +%s) - begin )) s, exit $rc$([ "$rc" = 124 ] && echo ' (time limit)')" | tee -a "$STAGE/steps.txt"
  pack
  return "$rc"
}
limit() {  # limit PART DEFAULT: the part's time limit in seconds
  local var="LIMIT_${1^^}"
  echo "${!var:-$2}"
}

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu; PRESET=smoke
  # the torch.compile rows are left out (--no-compile): the 2-core CPU takes minutes to build their graphs, the
  # card's host seconds; tests/test_graph_options.py checks the compiled step and the Predictor's compiled paths
  echo "cpu (smoke rehearsal: figures mean nothing)" > "$STAGE/card.txt"
else
  DEVICE=cuda; PRESET=paper
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$STAGE/card.txt"
fi
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN',
torch.backends.cudnn.version(), 'triton', triton.__version__)" >> "$STAGE/card.txt"
cat "$STAGE/card.txt"

start=$(date +%s)
if [ "$SMOKE" = 1 ]; then  # CI built the CPU extension; the rehearsal checks it loads
  "$PYTHON" -c "import expseg_fast._C" > "$STAGE/build.log" 2>&1
else
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 EXPSEG_FAST_CUDA=1 "$PYTHON" setup.py build_ext --inplace > "$STAGE/build.log" 2>&1
fi || { tail -40 "$STAGE/build.log"; pack; exit 1; }
echo "== build: $(( $(date +%s) - start )) s" | tee -a "$STAGE/steps.txt"

rc=0
for part in $PARTS; do
  case "$part" in
    tests)
      if [ "$SMOKE" = 1 ]; then selection=(--collect-only); else selection=(--maxfail=20); fi
      step tests "$(limit tests 150)" "$PYTHON" -m pytest ${SUITE_TESTS:-tests bench} -m cuda -q -p no:cacheprovider \
        "${selection[@]}" || rc=1 ;;
    inference)
      size=$([ "$SMOKE" = 1 ] && echo "--size 16 --repeats 1 --no-compile" || echo "--size 128")
      step inference "$(limit inference 120)" "$PYTHON" -m bench.compare_vnet --device "$DEVICE" $size --out "$STAGE" || rc=1 ;;
    train_step)
      size=$([ "$SMOKE" = 1 ] && echo "--size 32 --repeats 1 --no-compile" || echo "--size 128")  # 16^3: bench/NOTES.md
      step train_step "$(limit train_step 150)" "$PYTHON" -m bench.train_step --device "$DEVICE" $size --out "$STAGE" || rc=1 ;;
    loss)
      smoke=$([ "$SMOKE" = 1 ] && echo "--smoke")
      step loss "$(limit loss 150)" "$PYTHON" -m bench.gpu_loss $smoke --out "$STAGE" || rc=1 ;;
    norm)
      size=$([ "$SMOKE" = 1 ] && echo "--size 16 --repeats 1")
      step norm "$(limit norm 60)" "$PYTHON" -m bench.norm_step --device "$DEVICE" $size --out "$STAGE" || rc=1 ;;
    synth)
      preset=$([ "$SMOKE" = 1 ] && echo "--preset synth-cpu --size 32 --repeats 1" || echo "--preset synth-paper")
      step synth "$(limit synth 90)" "$PYTHON" -m bench.synth_step --device "$DEVICE" $preset --out "$STAGE" || rc=1 ;;
    nnunet)
      size=$([ "$SMOKE" = 1 ] && echo "--size 32 --stages 3 --repeats 1" || echo "--size 128")
      step nnunet "$(limit nnunet 90)" "$PYTHON" -m bench.nnunet_step --device "$DEVICE" $size --out "$STAGE" || rc=1 ;;
    paper)
      step paper "$(limit paper 330)" bash bench/paper_run.sh "$PRESET" "$(( $(limit paper 330) - 10 ))" "$STAGE" || rc=1 ;;
    real_scans)
      where=(); [ -d .realscans/colin27 ] && where=(--colin27 .realscans/colin27)
      for set in ${SUITE_REAL_SCANS:-}; do where+=(--data "$set"); done
      if [ "$SMOKE" = 1 ]; then
        how=(--preset synth-cpu --device cpu --run "$STAGE.real-scans" --score-seconds 120 -- --size 32 --precision fp32
             --synth-repeats 1 --epochs 1)
      else
        how=(--preset synth-paper --device cuda -- ${REAL_SCANS_TRAIN:-})
      fi
      step real_scans "$(limit real_scans 300)" "$PYTHON" -m bench.real_scans_run --stage "$STAGE" \
        --seconds "$(( $(limit real_scans 300) - 10 ))" "${where[@]}" "${how[@]}" || rc=1 ;;
    *)
      echo "unknown part '$part' (tests, inference, train_step, loss, norm, synth, nnunet, paper, real_scans)"; rc=2 ;;
  esac
done
pack
echo "== total: $(( $(date +%s) - start )) s after the start of the build"
cat "$OUT/summary.md"
exit "$rc"
