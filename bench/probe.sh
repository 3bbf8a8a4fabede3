#!/usr/bin/env bash
# One device call (2026-12-06): the tensor-core prefill's variants side by side (harness), the
# disk checksum's placement probe (bench/disk_crc_probe.cpp), then `bench prefill` with FlashInfer.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=9.0a
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
t0=$(date +%s)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
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
timeout 150 ./build/pa_check 2>&1 | tail -3   # the whole float64 sweep (head dims, dtypes, block sizes)
PKV_VARIANTS=14,0,9,11,12,15,1 PKV_ROUNDS=2 timeout 200 ./build/pa_check --prefill-bench 2>&1 | tee "$OUT/variants.txt"
./build/disk_crc_probe /tmp 128 2 21 2>&1 | tee "$OUT/crc_probe.txt"
wait $pip_pid; tail -1 "$OUT/build.log"; echo "all built: $(( $(date +%s) - t0 )) s"
timeout ${PREFILL_TIMEOUT:-330} python3 -m pagedkv bench prefill --out "$OUT" 2>&1 | tee "$OUT/prefill.txt" | grep -v -E "Warning|INFO"
(cd "$OUT" && tar czf logs.tgz --remove-files build.log 2>/dev/null)
ls -la "$OUT"
