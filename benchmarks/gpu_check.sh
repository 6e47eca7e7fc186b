#!/usr/bin/env bash
# One call on a GPU machine (H100/H200, 6-9 minutes): build the CUDA extension, run the CUDA-marked tests
# with the compiled Triton kernels, run the quick benchmarks, and write under OUT_DIR one log (gpu_check.log:
# device, versions, every step's output) and each benchmark's .json + .md (7 files: the device tool brings 8 back).
#
#   bash benchmarks/gpu_check.sh OUT_DIR          # e.g. bash benchmarks/gpu_check.sh "$OUT"
#
# Each step has its own time limit and the script goes on after a failed step (a failed build still leaves
# the Triton paths to test and time); the summary at the end says which steps failed, and the exit status
# is the number of failed steps. Set GPU_CHECK_STEPS to a subset of "build tests attention steprewards decode"
# to run fewer steps, and TORCH_CUDA_ARCH_LIST (default 9.0a) / MAX_JOBS (default: CPUs - 2) for the build.
set -u
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
steps=${GPU_CHECK_STEPS:-"build tests attention steprewards decode"}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET  # compiled Triton kernels: what ships
failed=()

log="$out/gpu_check.log"
: >"$log"

run() {  # run NAME LIMIT_S CMD...: output appended to the log, its tail echoed
  local name=$1 limit=$2
  shift 2
  case " $steps " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS part="$out/.$name.part"
  timeout "$limit" "$@" >"$part" 2>&1
  local rc=$?
  cat "$part" >>"$log"
  tail -n 25 "$part"
  rm -f "$part"
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$log"
  [ "$rc" -eq 0 ] || failed+=("$name($rc)")
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee -a "$log"

run build 240 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))}" \
  python setup.py build_ext --inplace
python -c "import o1kernels; print(o1kernels.available_backends('cuda'))" 2>&1 | tee -a "$log"
run tests 180 python -m pytest -q -m cuda tests -p no:cacheprovider --maxfail=20
run attention 120 python benchmarks/bench_attention.py --quick --tune --out "$out/"
run steprewards 60 python benchmarks/bench_step_rewards.py --quick --out "$out/"
run decode 180 python benchmarks/bench_decode.py --quick --out "$out/"

echo "=== summary: ${#failed[@]} failed step(s) ${failed[*]:-}" | tee -a "$log"
exit ${#failed[@]}
