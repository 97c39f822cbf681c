#!/usr/bin/env bash
# One command for a GPU machine, under 10 minutes: the kernel tests compiled (no interpreter), then
# every bench/bench_*.py that accepts the common flags (--out-dir, --quick; see bench/_common.py) in
# quick mode, writing JSONL + markdown under bench/results/. A failing step is logged and the rest
# still run; a summary table is printed last. Exit status: 0 only if every step passed.
#
#   bash bench/gpu_check.sh            # PY=python OUT_DIR=... BUDGET_S=... to override
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
OUT="${OUT_DIR:-bench/results}"
BUDGET="${BUDGET_S:-570}"  # seconds for everything; the 10-minute limit minus a margin
TEST_LIMIT="${TEST_LIMIT_S:-240}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # compiled kernels: the interpreter is for CPU-only machines
start=$SECONDS
names=() statuses=() seconds=()

record() { names+=("$1"); statuses+=("$2"); seconds+=("$3"); }

run_step() {  # run_step NAME LIMIT_S CMD...: run with a time limit, log to $OUT/gpu_check_NAME.log
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/gpu_check_${name}.log"
  rc=${PIPESTATUS[0]}
  if ((rc == 0)); then record "$name" ok $((SECONDS - t0))
  elif ((rc == 124 || rc == 137)); then record "$name" "TIMEOUT (${limit}s)" $((SECONDS - t0))
  else record "$name" "FAIL (rc=$rc)" $((SECONDS - t0)); fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "warning: nvidia-smi not found"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"

run_step pytest-kernels "$TEST_LIMIT" "$PY" -m pytest -q -m "gpu or not slow" tests/kernels

benches=(bench/bench_*.py)
for i in "${!benches[@]}"; do
  b=${benches[$i]}
  name=$(basename "$b" .py)
  # The common flags, spelled out or from _common.base_parser (cheaper than importing each for --help).
  if ! grep -qE -- '--out-dir|base_parser' "$b" || ! grep -qE -- '--quick|base_parser' "$b"; then
    echo "=== $name: skipped (does not accept --out-dir and --quick)"
    record "$name" "SKIP (flags)" 0
    continue
  fi
  left=$((BUDGET - (SECONDS - start)))
  share=$((left / (${#benches[@]} - i)))
  if ((share < 20)); then
    record "$name" "SKIP (budget)" 0
    continue
  fi
  run_step "$name" "$share" "$PY" "$b" --out-dir "$OUT" --quick
done

echo
echo "## gpu_check summary ($(date -u +%FT%TZ), $((SECONDS - start)) s, results in $OUT/)"
echo
printf '| %-24s | %-20s | %7s |\n' step status seconds
printf '|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..26})" "$(printf -- '-%.0s' {1..22})" "$(printf -- '-%.0s' {1..9})"
failed=0
for i in "${!names[@]}"; do
  printf '| %-24s | %-20s | %7s |\n' "${names[$i]}" "${statuses[$i]}" "${seconds[$i]}"
  [[ ${statuses[$i]} == ok || ${statuses[$i]} == SKIP* ]] || failed=1
done
exit $failed
