#!/usr/bin/env bash
# The GPU run, one call away: from a clean clone on a CUDA machine without internet, in under
# 8 minutes (the step limits add up to 7 m 50 s), into one results folder, $OUT:
#   1. env          the environment: GPU, driver, packages, what is missing      summary.txt
#   2. kernel tests tests/kernels compiled on CUDA (TRITON_INTERPRET=0; fp32,     kernel_tests.txt
#                   fp16, bf16), in parallel where pytest-xdist is installed
#   3. kernel table benchmarks/kernels.py --check: Triton against the spec,       kernels_log.txt,
#                   then the table at Llama-3-8B shapes                           kernels.md, kernels.json
#   4. engine       benchmarks/engine_gpu.py: random:llama-3-8b in bf16, 0/8/32   engine_log.txt,
#                   rank-16 adapters: tok/s, TTFT, ITL, memory                    results.json, RESULTS-gpu.md
# Eight files, no sub-folders. RESULTS-gpu.md (all four steps) is copied to benchmarks/RESULTS-gpu.md.
# A failed step does not stop the later ones; a step whose needs are missing (no CUDA, no pytest)
# is marked NOT RUN with the reason. Exit status: 0 only if every step passed.
#
#   OUT=/tmp/gpu benchmarks/gpu_check.sh
#   PYTHON=python3 LORAFLEET_COMMIT=<sha> benchmarks/gpu_check.sh    # a copy of the tree without .git
#
# PYTHON: default .venv/bin/python, else python3. Step limits (seconds): ENV_LIMIT, TESTS_LIMIT,
# TABLE_LIMIT, ENGINE_LIMIT. ENGINE_ARGS: extra arguments for benchmarks/engine_gpu.py.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
FILES=(summary.txt kernel_tests.txt kernels_log.txt kernels.md kernels.json engine_log.txt results.json RESULTS-gpu.md)
for f in "${FILES[@]}"; do rm -f "${OUT:?}/$f"; done  # no stale result from an earlier run
export OUT PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TRITON_INTERPRET=0
if [ -z "${LORAFLEET_COMMIT:-}" ]; then
  LORAFLEET_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null) || LORAFLEET_COMMIT="unknown (no .git: set LORAFLEET_COMMIT)"
fi
export LORAFLEET_COMMIT
ENV_LIMIT=${ENV_LIMIT:-20} TESTS_LIMIT=${TESTS_LIMIT:-90} TABLE_LIMIT=${TABLE_LIMIT:-120} ENGINE_LIMIT=${ENGINE_LIMIT:-240}

SUMMARY="$OUT/summary.txt"
STEPS=$(mktemp)  # the summary lines so far, quoted by the engine step in RESULTS-gpu.md
trap 'rm -f "$STEPS"' EXIT
failed=0
begun=$SECONDS

# record NAME STATUS SECONDS DETAIL: one summary line; any status but PASSED fails the run.
record() {
  local line
  line=$(printf '%-12s %-8s %4ss  %s' "$1" "$2" "$3" "$4")
  echo "$line" >>"$STEPS"
  echo "== $line"
  [ "$2" = PASSED ] || failed=1
}

# run_step LOG LIMIT CMD...: the command's output into LOG (its tail on the console); sets rc, took.
run_step() {
  local log=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  took=$((SECONDS - t0))
  tail -n 15 "$log"
}

# ---- 1. environment ---------------------------------------------------------------------------
echo "== 1/4 environment"
t0=$SECONDS
{
  echo "gpu_check.sh on $(hostname) at $(date -u '+%Y-%m-%d %H:%M:%S UTC'); commit $LORAFLEET_COMMIT; PYTHON=$PYTHON"
  echo "step limits (s): env $ENV_LIMIT, kernel tests $TESTS_LIMIT, kernel table $TABLE_LIMIT, engine $ENGINE_LIMIT"
  if command -v nvidia-smi >/dev/null; then
    timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv 2>&1
  else
    echo "nvidia-smi: not on PATH"
  fi
  df -h "${TMPDIR:-/tmp}" 2>&1 | tail -n 1 | awk '{print "temp folder: " $4 " free (the engine step writes ~2.7 GB of adapters there)"}'
} >"$SUMMARY" 2>&1
HAVE=$(mktemp)
timeout -k 5 "$ENV_LIMIT" "$PYTHON" - "$HAVE" >>"$SUMMARY" 2>&1 <<'PY'
import importlib, platform, sys

have = {}
print(f"python {platform.python_version()} at {sys.executable}")
for name in ("torch", "triton", "pytest", "xdist", "safetensors", "numpy", "regex", "tqdm", "tokenizers", "jinja2", "gguf"):
    try:
        module = importlib.import_module(name)
        have[name] = 1
        print(f"{name:12} {getattr(module, '__version__', 'installed')}")
    except Exception as exc:
        have[name] = 0
        need = {"torch": "every step", "triton": "steps 2-3, and the engine's Triton kernels",
                "pytest": "step 2", "xdist": "step 2 in parallel (optional)", "safetensors": "the engine's adapters",
                "gguf": "GGUF models only (optional)"}.get(name, "the engine")
        print(f"{name:12} MISSING ({type(exc).__name__}: {exc}): needed by {need}")
cuda = 0
if have["torch"]:
    import torch

    print(f"torch CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    if torch.cuda.is_available():
        cuda = 1
        props = torch.cuda.get_device_properties(0)
        print(f"CUDA device: {props.name}, {props.total_memory / 2**30:.1f} GiB, sm {props.major}.{props.minor}, "
              f"{props.multi_processor_count} SMs; {torch.cuda.device_count()} device(s)")
    else:
        print("no CUDA device visible to torch: steps 2-4 need one")
with open(sys.argv[1], "w") as f:
    f.write("".join(f"HAVE_{k.upper()}={v}\n" for k, v in have.items()) + f"HAVE_CUDA={cuda}\n")
PY
env_rc=$?
HAVE_TORCH=0 HAVE_TRITON=0 HAVE_PYTEST=0 HAVE_XDIST=0 HAVE_CUDA=0
# shellcheck disable=SC1090
[ -s "$HAVE" ] && . "$HAVE"
rm -f "$HAVE"
cat "$SUMMARY"
missing=""
[ "$HAVE_TORCH" = 1 ] || missing="$missing torch"
[ "$HAVE_CUDA" = 1 ] || missing="$missing CUDA-device"
[ "$HAVE_TRITON" = 1 ] || missing="$missing triton"
[ "$HAVE_PYTEST" = 1 ] || missing="$missing pytest"
if [ $env_rc -ne 0 ]; then
  record env FAILED $((SECONDS - t0)) "the environment report exited $env_rc (see summary.txt)"
elif [ -n "$missing" ]; then
  record env FAILED $((SECONDS - t0)) "missing:$missing"
else
  record env PASSED $((SECONDS - t0)) "CUDA, torch, triton and pytest present"
fi

# ---- 2. the kernel tests, compiled on CUDA --------------------------------------------------------
echo "== 2/4 tests/kernels on CUDA"
if [ "$HAVE_CUDA" != 1 ]; then
  record "kernel tests" "NOT RUN" 0 "no CUDA device visible to torch"
elif [ "$HAVE_PYTEST" != 1 ]; then
  record "kernel tests" "NOT RUN" 0 "pytest is not installed (carry its wheel); step 3 still checks Triton against the specification"
else
  parallel=()
  [ "$HAVE_XDIST" = 1 ] && parallel=(-n 8)  # Triton compiles dominate: one compiler per worker
  # -rA lists every test id with its outcome: the per-dtype counts below are read off those lines.
  run_step "$OUT/kernel_tests.txt" "$TESTS_LIMIT" "$PYTHON" -m pytest tests/kernels -q -rA -p no:cacheprovider \
    -p no:django "${parallel[@]}"
  result=$(grep -E '^=+ .*(passed|failed|error|skipped).* in [0-9.]+s' "$OUT/kernel_tests.txt" | tail -n 1 | tr -d '=' | xargs)
  dtypes=""
  for dtype in float32 float16 bfloat16; do
    ok=$(grep -c -E "^PASSED .*torch\.$dtype" "$OUT/kernel_tests.txt")
    bad=$(grep -c -E "^(FAILED|ERROR) .*torch\.$dtype" "$OUT/kernel_tests.txt")
    dtypes="$dtypes; $dtype $ok passed, $bad failed"
  done
  if [ $rc -eq 0 ]; then
    record "kernel tests" PASSED $took "${result:-?}$dtypes"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "kernel tests" TIMEOUT $took "past ${TESTS_LIMIT}s: ${result:-no pytest summary}"
  else
    record "kernel tests" FAILED $took "${result:-pytest exited $rc}$dtypes"
  fi
fi

# ---- 3. the kernel table at Llama-3-8B shapes ---------------------------------------------------------
echo "== 3/4 benchmarks/kernels.py --check (Llama-3-8B shapes)"
if [ "$HAVE_CUDA" != 1 ]; then
  record "kernel table" "NOT RUN" 0 "no CUDA device visible to torch"
elif [ "$HAVE_TRITON" != 1 ]; then
  record "kernel table" "NOT RUN" 0 "triton is not importable"
else
  run_step "$OUT/kernels_log.txt" "$TABLE_LIMIT" "$PYTHON" benchmarks/kernels.py --check --dtype bfloat16 \
    --budget 0.05 --out "$OUT"
  fails=$(grep -c '^FAIL' "$OUT/kernels_log.txt" || true)
  if [ $rc -eq 0 ]; then
    record "kernel table" PASSED $took "Triton matches the specification; table in kernels.md"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "kernel table" TIMEOUT $took "past ${TABLE_LIMIT}s ($fails correctness failures before that)"
  else
    record "kernel table" FAILED $took "exit $rc, $fails correctness failures (kernels_log.txt)"
  fi
fi

# ---- 4. the whole engine -------------------------------------------------------------------------------
echo "== 4/4 the whole engine (benchmarks/engine_gpu.py)"
if [ "$HAVE_CUDA" != 1 ]; then
  record engine "NOT RUN" 0 "no CUDA device visible to torch"
else
  # shellcheck disable=SC2086
  run_step "$OUT/engine_log.txt" "$ENGINE_LIMIT" "$PYTHON" benchmarks/engine_gpu.py --out "$OUT" \
    --steps "$STEPS" --kernel-table "$OUT/kernels.md" ${ENGINE_ARGS:-}
  status=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["status"])' "$OUT/results.json" 2>/dev/null)
  if [ $rc -eq 0 ]; then
    record engine PASSED $took "0/8/32 adapters measured (RESULTS-gpu.md)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record engine TIMEOUT $took "past ${ENGINE_LIMIT}s: ${status:-no results.json}"
  else
    record engine FAILED $took "exit $rc: ${status:-no results.json} (engine_log.txt)"
  fi
fi
if [ -s "$OUT/RESULTS-gpu.md" ]; then
  cp "$OUT/RESULTS-gpu.md" benchmarks/RESULTS-gpu.md
fi

# ---- summary ---------------------------------------------------------------------------------------
{
  echo
  echo "steps:"
  cat "$STEPS"
  echo "gpu_check: $([ $failed -eq 0 ] && echo PASSED || echo FAILED) in $((SECONDS - begun)) s; results in $OUT"
} >>"$SUMMARY"
extra=$(find "$OUT" -mindepth 1 -maxdepth 1 | grep -v -F -x -f <(printf "$OUT/%s\n" "${FILES[@]}") || true)
[ -n "$extra" ] && echo "note: $OUT holds files this run did not write (only 8 files come back from a device run): $extra" >>"$SUMMARY"
echo
echo "== summary"
sed -n '/^steps:/,$p' "$SUMMARY"
if [ "$HAVE_CUDA" != 1 ]; then
  echo "gpu_check: no CUDA device is visible to $PYTHON's torch, so nothing GPU-side ran: run this on a GPU machine" \
    "(on a CPU, 'pytest tests/kernels' runs the Triton kernels in the interpreter)" >&2
fi
exit $failed
