#!/usr/bin/env bash
# One device call (2026-12-06, third): the new default prefill kernel checked (float64 sweep),
# timed against the 12-04 kernel and the losing combination, the disk CRC placement probe, and
# the engine's checksum cost with writes on the crc32 path, the package's CUDA tests (pytest -k cuda).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
t0=$(date +%s)
(CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90a" python3 -m pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1; echo "pip rc=$?" >> "$OUT/build.log") &
pip_pid=$!
mkdir -p build/pa
F="-std=c++17 -O3 -Iinclude --expt-relaxed-constexpr -lineinfo -gencode=arch=compute_90a,code=sm_90a"
pids=()
for f in tests/cuda/paged_attention_check.cu tests/cuda/paged_attention_bench.cu cuda/paged_attention.cu cuda/prefill_sm90.cu cuda/kv_write.cu cuda/host_copy.cu; do
  nvcc $F -c $f -o build/pa/$(basename $f).o & pids+=($!)
done
g++ -O2 -std=c++17 -Iinclude bench/disk_crc_probe.cpp cpp/disk_file.cpp cpp/crc32c.cpp -pthread -o build/disk_crc_probe
wait "${pids[@]}"
nvcc -gencode=arch=compute_90a,code=sm_90a build/pa/*.o -o build/pa_check || exit 1
echo "harness built: $(( $(date +%s) - t0 )) s"
timeout 100 ./build/pa_check 2>&1 | tail -2
./build/disk_crc_probe /tmp 128 2 11 2>&1 | tee "$OUT/crc_probe.txt"
PKV_VARIANTS=14,0,13 PKV_ROUNDS=1 timeout 60 ./build/pa_check --prefill-bench 2>&1 | tee "$OUT/variants.txt"
wait $pip_pid; tail -1 "$OUT/build.log"; echo "all built: $(( $(date +%s) - t0 )) s"
timeout 60 python3 -m pagedkv bench checksum --device cuda --rounds 31 --gib 0.3 --out "$OUT" 2>&1 | grep -v -E "Warning|INFO"
timeout ${PYTEST_TIMEOUT:-100} python3 -m pytest tests/python -q -x -k "cuda and (prefill or attend or graph or hf)" -p no:cacheprovider > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | head -10
(cd "$OUT" && tar czf logs.tgz --remove-files build.log pytest.log 2>/dev/null)
