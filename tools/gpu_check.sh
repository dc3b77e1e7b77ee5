#!/usr/bin/env bash
# Build fastrec with the CUDA module on a GPU machine, run the CUDA tests and benches.
# Usage: tools/gpu_check.sh [tests|bench|sanitize|all]...   (writes logs to $OUT or ./gpu_out)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
REPO=$PWD
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
$PY -c "import cupy; print('cupy', cupy.__version__)" || true
t0=$(date +%s)
FASTREC_CUDA=ON FASTREC_CUDA_ARCHS=${FASTREC_CUDA_ARCHS:-90} CMAKE_BUILD_PARALLEL_LEVEL=16 \
  $PY -m pip install --no-build-isolation --no-deps -q "$REPO" 2>&1 | tail -20 || exit 1
echo "build: $(( $(date +%s) - t0 )) s"
cd /tmp
$PY -m fastrec.info
for what in "${@:-tests}"; do
  case $what in
    tests) $PY -m pytest -q -p no:cacheprovider "$REPO"/tests/test_cuda_*.py "$REPO"/tests/test_cupy_kernels.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -40 ;;
    cpu) $PY -m pytest -q -p no:cacheprovider -x "$REPO"/tests 2>&1 | tee "$OUT/pytest_all.log" | tail -15 ;;
    bench) for b in "$REPO"/benches/bench_cuda_*.py; do
             n=$(basename "$b" .py); $PY "$b" --json "$OUT/$n.json" 2>&1 | tee "$OUT/$n.log" | tail -40
           done ;;
    sanitize) compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -p no:cacheprovider -x \
                "$REPO"/tests/test_cuda_*.py "$REPO"/tests/test_cupy_kernels.py -k "not thread and not many" 2>&1 | tee "$OUT/sanitizer.log" | tail -25 ;;
  esac
done
