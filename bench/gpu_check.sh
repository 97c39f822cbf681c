#!/usr/bin/env bash
# One command for a GPU machine, under 10 minutes, on a bare image as is: python3 with torch, triton,
# transformers, safetensors, tokenizers, pytest, ninja, matplotlib, numpy; no network, no venv, no
# editable install, no alfworld. The repository root goes on PYTHONPATH (this script's own doing), a
# preflight fails loudly on any missing module (nothing is pip-installed), and only harness-free parts
# run: the fast tests of tests/kernels tests/csrc and the CUDA tests of tests/model (compiled kernels,
# no interpreter), then every bench/bench_*.py that accepts the common flags (--out-dir, --quick; see
# bench/_common.py) and does not import the harness, in quick mode, writing JSONL + markdown under
# bench/results/. A failing step is logged and the rest still run; a summary table is printed last.
# Exit status: 0 only if every step passed (2: the preflight failed, nothing ran).
#
#   bash bench/gpu_check.sh      # PY=python3 OUT_DIR=... BUDGET_S=... TEST_LIMIT_S=... MODEL_TEST_LIMIT_S=...
#   bash bench/gpu_check.sh --cpu-dry-run   # (or GPU_CHECK_DRY_RUN=1) rehearsal on a CPU machine:
#       the same preflight, imports, test files and benches, with TRITON_INTERPRET=1, no CUDA device,
#       --cpu-smoke sizes and results under runs/gpu_check_dry/ (bench/results/ is left alone)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
DRY="${GPU_CHECK_DRY_RUN:-0}"
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
PY="${PY:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3  # a bare image has no .venv
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the packages without an install
if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  OUT="${OUT_DIR:-runs/gpu_check_dry}"
  BENCH_FLAG=--cpu-smoke
  BUDGET="${BUDGET_S:-1800}"
  TEST_LIMIT="${TEST_LIMIT_S:-1200}"
  MODEL_TEST_LIMIT="${MODEL_TEST_LIMIT_S:-600}"
else
  unset TRITON_INTERPRET  # compiled kernels: the interpreter is for CPU-only machines
  OUT="${OUT_DIR:-bench/results}"
  BENCH_FLAG=--quick
  BUDGET="${BUDGET_S:-570}"  # seconds for everything; the 10-minute limit minus a margin
  TEST_LIMIT="${TEST_LIMIT_S:-240}"
  MODEL_TEST_LIMIT="${MODEL_TEST_LIMIT_S:-180}"  # FlexAttention compiles (fp32, bf16; forward + backward)
fi
TEST_DIRS=(tests/kernels tests/model tests/csrc)
mkdir -p "$OUT"
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

# Preflight: every module the steps import, the packages resolved from this checkout, a CUDA device.
echo "=== preflight ($PY, PYTHONPATH=$PYTHONPATH, dry run: $DRY)"
[[ $DRY == 1 ]] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
  || echo "warning: nvidia-smi not found"
if ! DRY=$DRY REPO=$REPO "$PY" - <<'EOF'
import importlib, os, sys
from pathlib import Path

need = ["torch", "triton", "numpy", "transformers", "safetensors", "tokenizers", "pytest", "ninja", "matplotlib"]
missing = []
for name in need:
    try:
        mod = importlib.import_module(name)
        print(f"  {name:13s} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001 - report every missing module, then fail
        missing.append(f"{name} ({type(e).__name__}: {e})")
for name in ("model", "kernels", "trainer"):  # `kernels` / `trainer` are also unrelated PyPI names
    try:
        path = Path(importlib.import_module(name).__file__).resolve()
        if not path.is_relative_to(Path(os.environ["REPO"])):
            missing.append(f"{name} resolves to {path}, not this checkout")
    except Exception as e:  # noqa: BLE001
        missing.append(f"{name} ({type(e).__name__}: {e})")
if "torch" in sys.modules:
    import torch

    cuda = torch.cuda.is_available()
    print(f"  cuda available: {cuda}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    if os.environ["DRY"] != "1" and not cuda:
        missing.append("a CUDA device (torch.cuda.is_available() is False; use --cpu-dry-run on a CPU machine)")
if missing:
    print("gpu_check preflight FAILED, nothing installed, nothing run:\n  - " + "\n  - ".join(missing))
    sys.exit(2)
EOF
then
  exit 2
fi

# Without alfworld (a bare image), test files that import the harness are left out, by name, loudly.
ignore=()
if ! "$PY" -c "import alfworld" >/dev/null 2>&1; then
  while IFS= read -r f; do
    echo "=== $f: left out (imports the ALFWorld harness; alfworld is not installed)"
    ignore+=("--ignore=$f")
  done < <(grep -lE '^\s*(from|import) (harness|alfworld|textworld)\b' $(find "${TEST_DIRS[@]}" -name 'test_*.py' | sort))
fi
# Kernels (+ csrc): every fast test, on CUDA tensors where parametrized; model: the CUDA tests only (its
# CPU tests run in `make test`; device time is scarce).
run_step pytest-kernels "$TEST_LIMIT" "$PY" -m pytest -q -m "gpu or not slow" "${ignore[@]}" tests/kernels tests/csrc
run_step pytest-model-gpu "$MODEL_TEST_LIMIT" "$PY" -m pytest -q -m gpu "${ignore[@]}" tests/model

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
  if grep -qE '^\s*(from|import) (harness|alfworld|textworld)\b' "$b"; then
    echo "=== $name: skipped (imports the ALFWorld harness, not on a bare GPU image)"
    record "$name" "SKIP (harness)" 0
    continue
  fi
  left=$((BUDGET - (SECONDS - start)))
  share=$((left / (${#benches[@]} - i)))
  if ((share < 20)); then
    record "$name" "SKIP (budget)" 0
    continue
  fi
  run_step "$name" "$share" "$PY" "$b" --out-dir "$OUT" "$BENCH_FLAG"
done

echo
echo "## gpu_check summary ($(date -u +%FT%TZ), $((SECONDS - start)) s, dry run: $DRY, results in $OUT/)"
echo
printf '| %-24s | %-20s | %7s |\n' step status seconds
printf '|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..26})" "$(printf -- '-%.0s' {1..22})" "$(printf -- '-%.0s' {1..9})"
failed=0
for i in "${!names[@]}"; do
  printf '| %-24s | %-20s | %7s |\n' "${names[$i]}" "${statuses[$i]}" "${seconds[$i]}"
  [[ ${statuses[$i]} == ok || ${statuses[$i]} == SKIP* ]] || failed=1
done
exit $failed
