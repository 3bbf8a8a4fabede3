#!/usr/bin/env bash
# Same-machine A/B of two source trees on a GPU machine: builds this tree and OLD (another
# checkout, e.g. `git archive <commit> | tar x -C _old`, carried as an ignored path) side by side,
# then runs one `python -m pagedkv bench` command on each, alternating, ROUNDS times.
#   bash bench/ab_commits.sh OLD_DIR ROUNDS bench-name [bench args...]
# JSON goes to $OUT/old-<round>/ and $OUT/new-<round>/; each run's last lines are printed.
set -uo pipefail
cd "$(dirname "$0")/.."
old=$(realpath "$1") rounds=$2; shift 2
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
t0=$(date +%s)
build() {  # build() SRC SITE BUILD_DIR LOG
  CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90a" python3 -m pip install -q --no-build-isolation --no-deps \
    --target "$2" --config-settings=build-dir="$3" "$1" > "$4" 2>&1 || { tail -30 "$4"; return 1; }
}
build "$old" /tmp/ab_site_old /tmp/ab_build_old "$OUT/build-old.log" & a=$!
build . /tmp/ab_site_new build/ab_new "$OUT/build-new.log" & b=$!
wait $a || exit 1
wait $b || exit 1
echo "builds: $(( $(date +%s) - t0 )) s"
for i in $(seq 1 "$rounds"); do
  for v in old new; do
    echo "== $v, round $i"
    out=(--out "$OUT/$v-$i")  # (a tree whose benches take no --out writes under its bench/results)
    grep -q -- '"--out"' "$([ $v = old ] && echo "$old" || echo .)/python/pagedkv/__main__.py" || out=()
    PYTHONPATH=/tmp/ab_site_$v timeout ${AB_TIMEOUT:-200} python3 -m pagedkv bench "$@" "${out[@]}" 2>&1 \
      | grep -v -E "Warning|INFO" | tail -${AB_TAIL:-8}
  done
done
