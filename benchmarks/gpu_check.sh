#!/usr/bin/env bash
# The GPU check, as two commands of at most 5 minutes each (one device call each; part bench right after part
# build-test on the same warm machine reuses its build and its Triton cache):
#
#   bash benchmarks/gpu_check.sh build-test OUT_DIR  # pre-checks, build (sm_90a), CUDA kernels asserted, CUDA tests
#   bash benchmarks/gpu_check.sh bench OUT_DIR       # the --quick benchmarks, L2 kept out, acceptance lines
#   bash benchmarks/gpu_check.sh sanitizer OUT_DIR   # apart, when minutes are left: compute-sanitizer runs
#
# First it prints its plan: every step with its expected time on an H200 and its time limit. Each step prints a
# progress line when it starts and when it ends (status, seconds); in between the lines that matter as they come
# (table rows, acceptance lines, failures, pytest's summary; a failed step's last lines after it); the whole
# output goes to OUT_DIR/gpu_check_<part>.log as it runs, and the benchmarks write their tables row by row
# (OUT_DIR/bench_*_<gpu|cpu>_<timestamp>.json/.md), so a step stopped at its limit keeps what it measured. A part
# never runs longer than its budget (GPU_CHECK_BUDGET, default 290 s): a step gets min(its limit, the budget left)
# and steps that find less than 15 s left are skipped. Exit status: the number of failed, timed-out or skipped
# steps. The CUDA tests run first in the order that matters (attention, step rewards, compiled CUDA, decoder),
# in parallel (pytest-xdist) when it is installed.
#
# GPU_CHECK_DRY_RUN=1 runs the plumbing on a machine without a GPU: the build and the CUDA-kernel assertion are
# stubbed, the tests run (their CUDA cases skip), the benchmarks run on the CPU (--device cpu); GPU_CHECK_LIMITS
# ("name=seconds ...") overrides step limits, e.g. to see a stopped step keep its rows.
set -u
cd "$(dirname "$0")/.."
part=${1:-}
out=${2:-}
case "$part" in build-test|bench|sanitizer) ;; *)
  echo "usage: bash benchmarks/gpu_check.sh build-test|bench|sanitizer OUT_DIR" >&2; exit 2 ;; esac
[ -n "$out" ] || { echo "usage: bash benchmarks/gpu_check.sh $part OUT_DIR" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
dry=${GPU_CHECK_DRY_RUN:-0}
budget=${GPU_CHECK_BUDGET:-290}
log="$out/gpu_check_$part.log"
: >"$log"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET  # compiled Triton kernels: what ships
export O1K_REQUIRE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-$(nproc)}
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the GPU image's torch is under python3

# pytest: parallel workers when pytest-xdist is there (Triton compiles dominate), a per-test limit with pytest-timeout
pytest_opts="-m cuda -p no:cacheprovider -v -rfE"
"$PY" -c "import xdist" 2>/dev/null && pytest_opts="$pytest_opts -n 8"
"$PY" -c "import pytest_timeout" 2>/dev/null && pytest_opts="$pytest_opts --timeout=120"
bench_opts="--quick --out $out/"
[ "$dry" = 1 ] && bench_opts="$bench_opts --device cpu"

# The steps that are more than one command (run through `bash -c`, hence exported).
prechecks() {
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader || [ "$dry" = 1 ] || return 1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
triton.__version__, 'gpu', torch.cuda.is_available())" || return 1
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'" || [ "$dry" = 1 ] || return 1
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found"; [ "$dry" = 1 ] || return 1; fi
  if command -v ninja >/dev/null; then echo "ninja $(ninja --version)"; else echo "ninja: missing (the build runs serial)"; fi
  "$PY" -c "import xdist" 2>/dev/null && echo "pytest-xdist: yes" || echo "pytest-xdist: no (the tests run serial)"
  "$PY" -c "import hypothesis" 2>/dev/null || echo "hypothesis: missing (tests/test_fuzz.py is skipped)"
}
has_cuda() {  # o1kernels._C of this tree has CUDA kernels and the cuda backend is usable
  "$PY" -c "import o1kernels._C as C, o1kernels; assert C.WITH_CUDA, 'o1kernels._C has no CUDA kernels';
print('o1kernels._C with CUDA kernels, backends on cuda:', o1kernels.available_backends('cuda'))"
}
build() {
  if [ "$dry" = 1 ]; then echo "[dry run] GPU step stubbed: $PY setup.py build_ext --inplace"; return; fi
  "$PY" setup.py build_ext --inplace
}
assert_cuda() {
  if [ "$dry" = 1 ]; then echo "[dry run] GPU step stubbed: assert o1kernels._C.WITH_CUDA"; return; fi
  has_cuda
}
ensure_cuda() {  # part bench on a fresh machine (part build-test's build gone): build again
  if [ "$dry" = 1 ]; then echo "[dry run] GPU step stubbed: assert o1kernels._C.WITH_CUDA, else build"; return; fi
  has_cuda || { echo "no CUDA build here (a fresh machine?): building"; "$PY" setup.py build_ext --inplace && has_cuda; }
}
export dry PY
export -f prechecks has_cuda build assert_cuda ensure_cuda

# name | expected seconds on an H200 (estimates, see README "GPU check") | limit seconds | command
case "$part" in
build-test) steps=(
  "prechecks|10|30|prechecks"
  "build|55|150|build"
  "cuda-kernels|5|30|assert_cuda"
  "tests-attention|50|80|$PY -m pytest $pytest_opts tests/test_tree_attention.py tests/test_shared_prefix_attention.py tests/test_merge_states.py"
  "tests-step-rewards|50|80|$PY -m pytest $pytest_opts tests/test_step_rewards.py"
  "tests-compiled-cuda|25|45|$PY -m pytest $pytest_opts tests/test_compiled_cuda.py -k 'not sanitizer'"
  "tests-decoder|40|60|$PY -m pytest $pytest_opts tests/test_decoder_runner.py"
  "tests-other|20|40|$PY -m pytest $pytest_opts tests --ignore tests/test_tree_attention.py --ignore tests/test_shared_prefix_attention.py --ignore tests/test_merge_states.py --ignore tests/test_step_rewards.py --ignore tests/test_compiled_cuda.py --ignore tests/test_decoder_runner.py"
) ;;
bench) steps=(
  "prechecks|10|30|prechecks"
  "cuda-kernels|3|150|ensure_cuda"
  "bench-attention|80|110|$PY benchmarks/bench_attention.py $bench_opts --paths"
  "bench-step-rewards|45|70|$PY benchmarks/bench_step_rewards.py $bench_opts"
  "bench-decode|100|130|$PY benchmarks/bench_decode.py $bench_opts"
) ;;
sanitizer) steps=(
  "cuda-kernels|3|150|ensure_cuda"
  "sanitizer|200|280|$PY -m pytest $pytest_opts tests/test_compiled_cuda.py -k sanitizer"
) ;;
esac

t0=$SECONDS
total=${#steps[@]}
say() { echo "[gpu_check $part +$((SECONDS - t0))s] $*" | tee -a "$log"; }
limit_of() {  # GPU_CHECK_LIMITS override of step $1, else $2
  local kv
  for kv in ${GPU_CHECK_LIMITS:-}; do [ "${kv%%=*}" = "$1" ] && { echo "${kv#*=}"; return; }; done
  echo "$2"
}

{
  echo "gpu_check $part: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(hostname), dry run: $dry"
  echo "plan: $total steps, budget ${budget}s (each step: min(its limit, the budget left))"
  expected_total=0
  for i in "${!steps[@]}"; do
    IFS='|' read -r name expected limit _ <<<"${steps[$i]}"
    expected_total=$((expected_total + expected))
    echo "  step $((i + 1))/$total $name: expected ~${expected}s on an H200, limit $(limit_of "$name" "$limit")s"
  done
  echo "  expected total ~${expected_total}s"
} | tee -a "$log"

failed=()
statuses=()
for i in "${!steps[@]}"; do
  IFS='|' read -r name expected limit cmd <<<"${steps[$i]}"
  limit=$(limit_of "$name" "$limit")
  left=$((budget - (SECONDS - t0)))
  if [ "$left" -lt 15 ]; then
    say "step $((i + 1))/$total $name: SKIPPED (${left}s of the ${budget}s budget left)"
    failed+=("$name(skipped)")
    statuses+=("$name: SKIPPED")
    continue
  fi
  [ "$limit" -gt $((left - 5)) ] && limit=$((left - 5))
  say "step $((i + 1))/$total $name: start (expected ~${expected}s, limit ${limit}s)"
  echo "\$ $cmd" >>"$log"
  start=$SECONDS
  part_log=$(mktemp)
  # live: table rows, acceptance lines, files written, failures, pytest's summary; everything into the log
  timeout -k 5 "$limit" bash -c "$cmd" 2>&1 | tee "$part_log" | tee -a "$log" |
    grep --line-buffered -E '^\| |^acceptance|^wrote|FAILED|ERROR|Error|^=+ .*(passed|failed|skipped|error)' |
    sed -u 's/^/    /'
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT at its ${limit}s limit"; failed+=("$name(timeout)") ;;
    *) status="FAILED (exit $rc)"; failed+=("$name($rc)") ;;
  esac
  [ "$rc" -eq 0 ] || grep -v '^|' "$part_log" | tail -n 10 | sed 's/^/    > /'
  rm -f "$part_log"
  statuses+=("$name: $status")
  say "step $((i + 1))/$total $name: $status in $((SECONDS - start))s"
done

if [ "$part" = bench ]; then
  echo "acceptance lines (from the benchmarks' output above):"
  grep -h '^acceptance' "$log" | sed 's/^/  /'
  for st in "${statuses[@]}"; do  # a benchmark that did not finish printed none: its lines are NOT measured
    case "$st" in bench-*": ok") ;; bench-*) echo "  acceptance of ${st%%:*}: NOT measured (${st#*: })" ;; esac
  done
fi
say "done: ${#failed[@]} of $total steps not ok ${failed[*]:-}; log $log"
exit ${#failed[@]}
