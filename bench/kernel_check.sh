#!/usr/bin/env bash
# One GPU call: the kernel harness (tests/cuda) against float64, then its timings.
#   bash bench/kernel_check.sh [quick|full] [prefill|decode|none]
# Uses build/pa_check when it runs here, else compiles it (sm_90a) first.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
if ! [ -x build/pa_check ] || ldd build/pa_check 2>&1 | grep -q "not found"; then
  mkdir -p build
  nvcc -std=c++17 -O3 -Iinclude --expt-relaxed-constexpr -lineinfo -gencode=arch=compute_90a,code=sm_90a \
    tests/cuda/paged_attention_check.cu tests/cuda/paged_attention_bench.cu cuda/paged_attention.cu \
    cuda/prefill_sm90.cu cuda/kv_write.cu cuda/host_copy.cu -o build/pa_check || exit 1
fi
mode=${1:-quick}
if [ "$mode" = quick ]; then timeout 120 ./build/pa_check --quick; else timeout 300 ./build/pa_check; fi
echo "check rc=$?"
case "${2:-prefill}" in
  prefill) timeout 200 ./build/pa_check --prefill-bench ${OUT:+$OUT/prefill_harness.txt} ;;
  decode) timeout 200 ./build/pa_check --bench ${OUT:+$OUT/decode_harness.txt} ;;
esac
