#!/usr/bin/env bash
# One call on a lent GPU machine: build, test (ctest incl. the CUDA kernel sweep, pytest on CUDA),
# then the demo and benchmarks, with peers and ceilings in the same run. Logs and JSON go to $OUT.
# Usage there: bash bench/device_run.sh [tests|bench|all]   (FlashInfer wheels travel in .whl/)
set -uo pipefail
what=${1:-all}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=9.0a PAGEDKV_BENCH_DIR="$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
t0=$(date +%s)
CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90a" PAGEDKV_TESTS=ON \
  python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
if [ "$what" = tests ] || [ "$what" = all ]; then
  ctest --test-dir build/py --output-on-failure -j8 > "$OUT/ctest.log" 2>&1; echo "ctest rc=$?"; tail -3 "$OUT/ctest.log"
  grep -E "checked|FAIL" "$OUT/ctest.log" | head -5
  timeout 420 python3 -m pytest tests/python -q -x -k "${PYTEST_K:-cuda}" > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"; tail -15 "$OUT/pytest.log"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 200 python3 -m pagedkv demo 2>&1 | tail -8
  python3 -m pagedkv bench host --device cuda 2>&1 | tail -6
  timeout 300 python3 -m pagedkv bench kernel 2>&1 | tee "$OUT/kernel.txt" | grep -v Warning
fi
