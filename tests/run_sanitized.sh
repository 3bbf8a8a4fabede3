#!/usr/bin/env bash
# ASan + UBSan: builds the C++ core, the GoogleTest suite and the Python module with
# -fsanitize=address,undefined (CMake option PAGEDKV_SANITIZE, CUDA off) in build/asan, runs ctest
# there, then a bounded pytest subset against that module with the sanitizer runtime preloaded.
# Any finding fails the run. Needs what tests/run.sh installs (run that first); extra arguments
# go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

mkdir -p build/asan
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
if ! { cmake -S . -B build/asan "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPAGEDKV_CUDA=OFF \
         -DPAGEDKV_PYTHON=ON -DPAGEDKV_TESTS=ON -DPAGEDKV_SANITIZE=ON \
         -DPython_EXECUTABLE="$(python3 -c 'import sys; print(sys.executable)')" &&
       cmake --build build/asan -j"$(nproc)"; } \
       >build/asan/build.log 2>&1; then
  tail -60 build/asan/build.log
  echo "tests/run_sanitized.sh: the sanitizer build failed (full log: build/asan/build.log)" >&2
  exit 1
fi
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir build/asan --output-on-failure -j2

# The module beside a copy of the Python package, imported instead of the installed one. The
# runtime goes first into a Python that was not built with it; libstdc++ with it, since ASan only
# intercepts C++ throws when libstdc++ is there at start-up. Leaks are not checked: the
# interpreter and torch keep memory to the end by design.
rm -rf build/asan/py
mkdir -p build/asan/py
cp -r python/pagedkv build/asan/py/
cp build/asan/_C*.so build/asan/py/pagedkv/
export PYTHONPATH="$PWD/build/asan/py"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0
python3 -c "import pagedkv; assert pagedkv._C.__file__.startswith('$PWD/build/asan/'), pagedkv._C.__file__"
python3 -m pytest -q -p no:cacheprovider \
  tests/python/test_disk_integrity.py tests/python/test_tiers.py tests/python/test_cache_ops.py \
  tests/python/test_errors.py tests/python/test_threads_gil.py tests/python/test_striping.py "$@"
