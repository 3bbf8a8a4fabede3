#!/usr/bin/env bash
# One GPU call: the kernel harness (tests/cuda) against float64, then its timings.
#   bash bench/kernel_check.sh [quick|full] [prefill|decode|none]
#   PKV_VARIANTS=14,0,13 PKV_ROUNDS=2: prefill kernel variants side by side (cuda/prefill_sm90.cu);
#   NCU_SHAPE=i: hardware counters of one prefill shape; NCU_SRC=1: per-instruction stall samples
#   (bench/ncu_stalls.py)
# Uses build/pa_check when it runs here, else compiles it (sm_90a) first.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
if ! [ -x build/pa_check ] || ldd build/pa_check 2>&1 | grep -q "not found"; then
  mkdir -p build
  nvcc -std=c++17 -O3 -Iinclude --expt-relaxed-constexpr -lineinfo -gencode=arch=compute_90a,code=sm_90a \
    tests/cuda/paged_attention_check.cu tests/cuda/paged_attention_bench.cu tests/cuda/block_crc_check.cu \
    cuda/paged_attention.cu cuda/prefill_sm90.cu cuda/kv_write.cu cuda/host_copy.cu cuda/block_crc.cu \
    cpp/crc32c.cpp -o build/pa_check || exit 1
fi
mode=${1:-quick}
case "$mode" in
  quick) timeout 120 ./build/pa_check --quick ;;
  full) timeout ${CHECK_TIMEOUT:-300} ./build/pa_check ;;
esac
echo "check rc=$?"
if [ -n "${NCU_SHAPE:-}" ]; then  # hardware counters of the tensor-core prefill kernel on one shape
  PKV_SHAPE=$NCU_SHAPE timeout 240 ncu --clock-control none -k regex:prefill_sm90 -c 1 \
    --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section Occupancy --section SchedulerStats --section InstructionStats \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    ./build/pa_check --prefill-bench > ${OUT:-/tmp}/ncu.txt 2>&1; echo "ncu rc=$?"
  cuobjdump --dump-sass build/pa_check 2>/dev/null | awk '/Function : .*prefill_sm90_kernelI13__nv_bfloat16Li128/{p=1} p&&/Function : /&&!/Li128/{p=0} p' > ${OUT:-/tmp}/sass128.txt
  grep -c HGMMA ${OUT:-/tmp}/sass128.txt
fi
if [ -n "${NCU_SRC:-}" ]; then  # where the prefill kernel's warps wait, per instruction (shape PKV_SHAPE, variant PKV_VARIANTS)
  PKV_SHAPE=${PKV_SHAPE:-1} PKV_VARIANTS=${PKV_VARIANTS:-0} timeout 240 ncu --clock-control none -k regex:prefill_sm90 -c 1 \
    --section SourceCounters --section WarpStateStats --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --import-source yes -f -o ${OUT:-/tmp}/src ./build/pa_check --prefill-bench > ${OUT:-/tmp}/ncu-src.log 2>&1; echo "ncu rc=$?"
  ncu -i ${OUT:-/tmp}/src.ncu-rep --page source --csv --print-source sass > ${OUT:-/tmp}/src-sass.csv \
    && python3 bench/ncu_stalls.py ${OUT:-/tmp}/src-sass.csv 30 | tee ${OUT:-/tmp}/stalls.txt
  rm -f ${OUT:-/tmp}/src.ncu-rep
fi
case "${2:-prefill}" in
  prefill) timeout 200 ./build/pa_check --prefill-bench ${OUT:+$OUT/prefill_harness.txt} ;;
  decode) timeout 200 ./build/pa_check --bench ${OUT:+$OUT/decode_harness.txt} ;;
esac
