#!/usr/bin/env bash
# Device call 1 (2026-12-06): prefill variants + source-level stall profile; disk checksum cost.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)"
t0=$(date +%s)
(CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90a" python3 -m pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1; echo "pip rc=$?" >> "$OUT/build.log") &
pip_pid=$!
mkdir -p build/pa
F="-std=c++17 -O3 -Iinclude --expt-relaxed-constexpr -lineinfo -gencode=arch=compute_90a,code=sm_90a"
for f in tests/cuda/paged_attention_check.cu tests/cuda/paged_attention_bench.cu cuda/paged_attention.cu cuda/prefill_sm90.cu cuda/kv_write.cu cuda/host_copy.cu; do
  nvcc $F -c $f -o build/pa/$(basename $f).o &
done
wait $(jobs -p | grep -v $pip_pid) 2>/dev/null
nvcc -gencode=arch=compute_90a,code=sm_90a build/pa/*.o -o build/pa_check || exit 1
echo "harness built: $(( $(date +%s) - t0 )) s"
timeout 150 ./build/pa_check --quick 2>&1 | tail -4
PKV_VARIANTS=0,2,3,5,6,7,9,10 PKV_ROUNDS=3 timeout 240 ./build/pa_check --prefill-bench 2>&1 | tee "$OUT/variants.txt"
for v in 0 9; do
  PKV_SHAPE=1 PKV_VARIANTS=$v timeout 150 ncu --clock-control none -k regex:prefill_sm90 -c 1 --section WarpStateStats \
    --section SourceCounters --section SpeedOfLight --section ComputeWorkloadAnalysis --section SchedulerStats \
    --import-source yes -f -o "$OUT/src$v" ./build/pa_check --prefill-bench > "$OUT/ncu-run$v.log" 2>&1
  echo "ncu v$v rc=$?"
  ncu -i "$OUT/src$v.ncu-rep" --page source --csv --print-source sass > "$OUT/src$v-sass.csv" 2>>"$OUT/ncu-run$v.log"; echo "source page rc=$? $(wc -c < $OUT/src$v-sass.csv)"
  ncu -i "$OUT/src$v.ncu-rep" --page details > "$OUT/details$v.txt" 2>&1
  grep -E "Duration|Issue Slots Busy|Eligible Warps|No Eligible|Compute \(SM\) Throughput" "$OUT/details$v.txt" | head -8
done
wait $pip_pid; tail -2 "$OUT/build.log"; echo "all built: $(( $(date +%s) - t0 )) s"
for a in "--device cuda" "--device cuda --control" "--device cpu --dtype bfloat16" "--device cuda --dtype float32" "--device cuda"; do
  echo "== checksum $a"; timeout 120 python3 -m pagedkv bench checksum $a --rounds 41 --gib 0.5 --out "$OUT" 2>&1 | grep -v -E "Warning|INFO"
done
rm -f "$OUT"/*.ncu-rep
(cd "$OUT" && tar czf all.tgz --remove-files $(ls | grep -v -E "^variants.txt$") 2>/dev/null)
ls -la "$OUT"
