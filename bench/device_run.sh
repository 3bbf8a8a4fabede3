#!/usr/bin/env bash
# One call on a lent GPU machine: build, test (ctest incl. the CUDA kernel sweep, pytest on CUDA),
# then the demo and benchmarks, with peers and ceilings in the same run. Logs and JSON go to $OUT.
# Usage there: bash bench/device_run.sh [PARTS]   (FlashInfer wheels travel in .whl/)
#   PARTS: comma-separated of tests, pytest, harness, demo, kernel, prefill, ncu, offload, checksum,
#   serve, longctx, longctx1m, hf; pytest: the pytest line of tests alone; harness: the kernel check
#   (every case; CHECK_MODE=--quick: the short sweep) and the prefill variants' timings
#   (PKV_VARIANTS, PKV_ROUNDS: bench/kernel_check.sh); CHECKSUM_RUNS=N: the checksum part's first N;
#   ncu: Nsight Compute of our decode kernel beside FlashInfer's and SDPA's (NCU_SHAPE="16 32768");
#   env: HF_ARGS, SERVE_ARGS, LONGCTX_ARGS, PREFILL_ARGS (e.g. --quick), PYTEST_K and *_TIMEOUT (see below);
#   longctx1m: mode (d) to 1M tokens on a machine with 512 GiB of RAM (an x4 kind);
#   checksum: the disk CRC's placement outside the engine (bench/disk_crc_probe.cpp), then the
#   engine's paired cost with CUDA caches (the CRC on the GPU going down; up, the folding CRC, the
#   crc32 instruction's, whole-block reads), its A/A control and CPU caches of the same block size;
#   all = tests,demo,kernel,offload,serve; more = longctx,hf (the long runs)
set -uo pipefail
what=${1:-all}
what=${what/all/tests,demo,kernel,offload,serve}
what=${what/more/longctx,hf}
has() { [[ ",$what," == *",$1,"* ]]; }
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=9.0a
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
t0=$(date +%s)
CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90a" PAGEDKV_TESTS=ON \
  python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
# 2026-11-26: a std::ostream insertion inside _C crashed there (SIGSEGV in libstdc++'s locale
# code, with libstdc++ symbols resolved inside _C); keep what the link looked like in the log.
{ echo "CXXFLAGS=${CXXFLAGS:-} LDFLAGS=${LDFLAGS:-}"; ldd build/py/_C*.so; } > "$OUT/link.txt" 2>&1
if has tests; then
  ctest --test-dir build/py --output-on-failure -j8 > "$OUT/ctest.log" 2>&1; echo "ctest rc=$?"; tail -3 "$OUT/ctest.log"
  grep -E "checked|FAIL" "$OUT/ctest.log" | head -5
  for tool in memcheck racecheck; do  # the kernels under compute-sanitizer, a representative sweep
    timeout ${SAN_TIMEOUT:-200} compute-sanitizer --tool $tool --error-exitcode 9 build/py/pagedkv_cuda_check --quick \
      > "$OUT/sanitizer-$tool.log" 2>&1; echo "compute-sanitizer $tool rc=$?"; tail -2 "$OUT/sanitizer-$tool.log"
  done
fi
if has tests || has pytest; then
  timeout ${PYTEST_TIMEOUT:-240} python3 -m pytest tests/python -q -k "${PYTEST_K:-cuda}" -p no:cacheprovider > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | head -20
fi
if has harness; then  # the kernels against float64 (every case), then the prefill kernel's variants side by side
  timeout ${CHECK_TIMEOUT:-200} build/py/pagedkv_cuda_check ${CHECK_MODE:-} > "$OUT/check.log" 2>&1; echo "check rc=$?"; tail -3 "$OUT/check.log"
  PKV_VARIANTS=${PKV_VARIANTS:-0,1} PKV_ROUNDS=${PKV_ROUNDS:-2} timeout 200 build/py/pagedkv_cuda_check --prefill-bench \
    "$OUT/prefill_harness.txt" 2>&1 | tail -30
fi
has demo && timeout 100 python3 -m pagedkv demo --prompt 8192 --steps 128 2>&1 | tail -6
has kernel && timeout 200 python3 -m pagedkv bench kernel --out "$OUT" 2>&1 | tee "$OUT/kernel.txt" | grep -v -E "Warning|INFO"
if has checksum; then
  g++ -O2 -std=c++17 -Iinclude bench/disk_crc_probe.cpp cpp/disk_file.cpp cpp/crc32c.cpp cpp/checksum_threads.cpp \
    -pthread -o build/disk_crc_probe \
    && ./build/disk_crc_probe /tmp 128 2 21 2>&1 | tee "$OUT/crc_probe.txt"
  # --disk-crc fold: the disk tier's CPU CRC on the AVX-512 folding instead of the crc32 instruction;
  # --disk-read-piece 0: blocks read whole, then checked (PagedKV(disk_crc=, disk_read_piece=)).
  for run in "--device cuda" "--device cuda --disk-crc fold" "--device cuda --disk-read-piece 0" \
             "--device cuda --control" "--device cpu --dtype bfloat16" "--device cpu --dtype bfloat16 --disk-crc fold"; do
    (( ${CHECKSUM_RUNS:-99} > 0 )) || break; CHECKSUM_RUNS=$(( ${CHECKSUM_RUNS:-99} - 1 ))  # (the first N runs only)
    echo "== bench checksum $run"
    timeout ${CHECKSUM_TIMEOUT:-120} python3 -m pagedkv bench checksum $run \
      --rounds ${CHECKSUM_ROUNDS:-41} --gib 0.5 --out "$OUT" 2>&1 | grep -v -E "Warning|INFO"
  done
fi
# DEADLINE (seconds from the build's start): the prefill bench is cut there, so the archive below still runs
left() { local l=$(( ${DEADLINE:-100000} - ($(date +%s) - t0) )); (( l < $1 )) && echo $(( l > 1 ? l : 1 )) || echo $1; }
has prefill && timeout $(left ${PREFILL_TIMEOUT:-400}) python3 -m pagedkv bench prefill --out "$OUT" ${PREFILL_ARGS:-} 2>&1 | tee "$OUT/prefill.txt" | grep -v -E "Warning|INFO"
if has ncu; then  # hardware counters: ours against the peers on one shape (bench/ncu_kernel.py)
  timeout ${NCU_TIMEOUT:-240} ncu --clock-control none --profile-from-start off --set full -f -o "$OUT/ncu" \
    python3 bench/ncu_kernel.py ${NCU_SHAPE:-16 32768} > "$OUT/ncu-run.log" 2>&1; echo "ncu rc=$?"
  ncu -i "$OUT/ncu.ncu-rep" --page raw --csv > "$OUT/ncu-raw.csv" 2>> "$OUT/ncu-run.log"
  python3 bench/ncu_summary.py "$OUT/ncu-raw.csv" | tee "$OUT/ncu-summary.txt"
  rm -f "$OUT/ncu.ncu-rep"  # too large to come back; the raw CSV holds every metric
fi
has offload && timeout ${OFFLOAD_TIMEOUT:-300} python3 -m pagedkv bench offload --out "$OUT" 2>&1 | tee "$OUT/offload.txt" | tail -24
has serve && timeout ${SERVE_TIMEOUT:-300} python3 -m pagedkv bench serve --out "$OUT" ${SERVE_ARGS:-} 2>&1 | tee "$OUT/serve.txt" | tail -16
has longctx && timeout ${LONGCTX_TIMEOUT:-400} python3 -m pagedkv bench longctx --out "$OUT" ${LONGCTX_ARGS:-} 2>&1 | tee "$OUT/longctx.txt" | tail -40
has longctx1m && timeout 560 python3 -m pagedkv bench longctx --out "$OUT" --modes d --batches 1 --host-gib 400 \
  --disk-gib 130 --disk-path "${DISK_PATH:-/tmp}" 2>&1 | tee "$OUT/longctx1m.txt" | tail -12
has hf && timeout ${HF_TIMEOUT:-400} python3 -m pagedkv bench hf --out "$OUT" ${HF_ARGS:-} 2>&1 | tee "$OUT/hf.txt" | tail -16
# At most 8 files come back: the JSON and plots alone, every log in one archive.
(cd "$OUT" && tar czf logs.tgz --remove-files $(ls | grep -v -E "\.(json|png)$") 2>/dev/null)
true
