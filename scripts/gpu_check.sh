#!/usr/bin/env bash
# Check skstego on a fresh GPU machine in one call: the GPU tests and every
# benchmark against its CPU peer, all outputs in one folder. See --help.
set -u

usage() {
    cat <<'HELP'
Usage: bash scripts/gpu_check.sh [--device cuda|cpu] [--quick] [OUTDIR]

Runs, from the repository root, with a timeout on each step and going on
after a failing step:
  1. setup     installs the wheels of .whl/ (if any) into a private folder:
               pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
               and sets PYTHONPATH=$SITE:$PWD (no network needed)
  2. versions  nvidia-smi, python, torch (+ CUDA), timm, scikit-learn, skstego
  3. pytest    python -m pytest -m gpu tests  (junit xml + log)
  4. bench     python benchmarks/run_all.py --device cuda  (Markdown table)
within 9 minutes in total, and exits non-zero at the end if any step failed.

OUTDIR (default: $OUT if set, else ./gpu-check-out) receives
  summary.txt            one line per step: status, seconds
  setup.log versions.txt nvidia-smi.txt
  pytest-gpu.log pytest-gpu.xml
  results.md             the benchmark table, ready for benchmarks/RESULTS.md
  bench.log bench-logs/  run_all's output and each benchmark's log

Options:
  --device cuda|cpu  where the benchmarks run (default cuda)
  --quick            dry run in about a minute: pytest -m gpu on one test
                     file only, run_all.py --quick (three tiny benchmarks).
                     bash scripts/gpu_check.sh --device cpu --quick /tmp/dry
  -h, --help         this text

Carrying the pure-Python dependencies to a machine without network (it has
torch, timm and scikit-learn; hnne, finch-clust and pynndescent are missing):
on a machine with network, in the repository root, make the .whl/ folder
    pip wheel --no-deps -w .whl hnne==2.0.1 finch-clust==0.2.3 pynndescent==0.7.0
    pip wheel --no-deps -w .whl .          # skstego itself (optional: the
                                           # working tree is on PYTHONPATH)
and carry it with the working tree (untracked files travel with it; where
.whl/ is git-ignored, name it in what you carry, e.g. carry=[".whl"]). hnne also needs numba;
where numba is missing, the hnne benchmark reports n/a, as faiss does.
Environment: SITE (default /tmp/skstego-site), PYTHON (default python),
GPU_CHECK_TOTAL (seconds for the whole check, default 540).
HELP
}

DEVICE=cuda
QUICK=0
OUTDIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --device) DEVICE="${2:?--device needs cuda or cpu}"; shift 2 ;;
        --device=*) DEVICE="${1#--device=}"; shift ;;
        --quick) QUICK=1; shift ;;
        -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) OUTDIR="$1"; shift ;;
    esac
done
case "$DEVICE" in
    cpu|cuda|cuda:*) ;;
    *) echo "gpu_check.sh: --device must be cuda, cuda:N or cpu, got $DEVICE" >&2; exit 2 ;;
esac
OUTDIR="${OUTDIR:-${OUT:-./gpu-check-out}}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
PYTHON="${PYTHON:-python}"
SITE="${SITE:-/tmp/skstego-site}"
TOTAL="${GPU_CHECK_TOTAL:-540}"
export HF_HUB_OFFLINE=1
START=$(date +%s)
FAILED=()
: > "$OUTDIR/summary.txt"

# step NAME TIMEOUT_S LOGFILE COMMAND...: run with a timeout, log, record
step() {
    local name="$1" limit="$2" log="$3"
    shift 3
    local left=$(( TOTAL - ($(date +%s) - START) ))
    if [ "$limit" -gt "$left" ]; then limit="$left"; fi
    if [ "$limit" -lt 5 ]; then
        echo "$name: skipped (the ${TOTAL} s budget is spent)" | tee -a "$OUTDIR/summary.txt"
        FAILED+=("$name")
        return
    fi
    local t0=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    local secs=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        echo "$name: ok (${secs} s)" | tee -a "$OUTDIR/summary.txt"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "$name: TIMED OUT after ${limit} s (log: $(basename "$log"))" | tee -a "$OUTDIR/summary.txt"
        FAILED+=("$name")
    else
        echo "$name: FAILED, exit $rc (${secs} s, log: $(basename "$log"))" | tee -a "$OUTDIR/summary.txt"
        FAILED+=("$name")
    fi
}

setup() {
    if compgen -G ".whl/*.whl" > /dev/null; then
        mkdir -p "$SITE" &&
            "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl &&
            echo "installed into $SITE:" && ls .whl
    else
        echo "no .whl/ folder: using the working tree and what is installed"
    fi
}

versions() {
    "$PYTHON" - <<'PY'
import importlib, importlib.util, platform, sys
print("python", sys.version.split()[0], platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("timm", "sklearn", "numpy", "skstego"):
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "?"), module.__file__)
# optional peers: found or not (importing numba would cost seconds)
for name in ("hnne", "numba", "pynndescent", "faiss", "pydensecrf", "zarr"):
    spec = importlib.util.find_spec(name)
    print(name, "found at", spec.origin if spec else None)
PY
    local rc=$?
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1
    else
        echo "nvidia-smi not found" > "$OUTDIR/nvidia-smi.txt"
    fi
    return $rc
}

if [ -n "${PYTHONPATH:-}" ]; then
    export PYTHONPATH="$SITE:$ROOT:$PYTHONPATH"
else
    export PYTHONPATH="$SITE:$ROOT"
fi
echo "gpu_check: device $DEVICE, quick $QUICK, outputs in $OUTDIR" | tee -a "$OUTDIR/summary.txt"

export PYTHON SITE OUTDIR
export -f setup versions
step setup 60 "$OUTDIR/setup.log" bash -c setup
step versions 60 "$OUTDIR/versions.txt" bash -c versions

if [ "$QUICK" -eq 1 ]; then
    TESTS=(tests/test_postprocess.py)
    BENCH=(--quick)
    PYTEST_LIMIT=60
    BENCH_LIMIT=150
else
    TESTS=(tests)
    BENCH=()
    PYTEST_LIMIT=150
    BENCH_LIMIT=400
fi
step pytest "$PYTEST_LIMIT" "$OUTDIR/pytest-gpu.log" \
    "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -rs \
    --junitxml="$OUTDIR/pytest-gpu.xml" "${TESTS[@]}"
LEFT=$(( TOTAL - ($(date +%s) - START) - 15 ))
if [ "$LEFT" -lt "$BENCH_LIMIT" ]; then BENCH_LIMIT="$LEFT"; fi
step bench "$BENCH_LIMIT" "$OUTDIR/bench.log" \
    "$PYTHON" benchmarks/run_all.py --device "$DEVICE" "${BENCH[@]}" \
    --out "$OUTDIR/results.md" --logs "$OUTDIR/bench-logs" \
    --budget $(( BENCH_LIMIT > 20 ? BENCH_LIMIT - 10 : 10 ))

echo "total $(( $(date +%s) - START )) s" | tee -a "$OUTDIR/summary.txt"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_check: failed steps: ${FAILED[*]}" | tee -a "$OUTDIR/summary.txt" >&2
    exit 1
fi
echo "gpu_check: all steps passed" | tee -a "$OUTDIR/summary.txt"
