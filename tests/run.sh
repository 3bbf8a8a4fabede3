#!/usr/bin/env bash
# Installs what the tests need, builds pagedkv (with CUDA when nvcc exists, so the kernels
# compile-check) and the GoogleTest suite, then runs ctest and pytest. GPU tests skip without a GPU.
# PAGEDKV_CUDA_ARCHS="80;90a" limits the CUDA architectures built (default: see cmake/cuda_arch.cmake).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg -s libgtest-dev >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq libgtest-dev >/dev/null
  else
    echo "tests/run.sh: libgtest-dev is missing; install it with: sudo apt-get install -y libgtest-dev" >&2
    exit 1
  fi
fi
python3 -m pip install -q torch==2.13.0 numpy pytest hypothesis nanobind scikit-build-core ninja "cmake>=3.24"
# transformers for the pagedkv.hf equivalence tests (torch stays the pinned one above)
python3 -m pip install -q transformers==5.17.0 tokenizers==0.23.3 safetensors==0.8.0 huggingface-hub==1.33.0 \
  hf-xet==1.8.0 typer==0.29.2 click==8.5.1 rich==15.0.0 httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 \
  anyio==4.16.0 shellingham==1.5.4 markdown-it-py==4.3.0 mdurl==0.1.2 annotated-doc==0.0.7 tqdm==4.70.1 \
  typing-extensions==4.16.0

if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
if [ -n "${PAGEDKV_CUDA_ARCHS:-}" ]; then
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_CUDA_ARCHITECTURES=${PAGEDKV_CUDA_ARCHS}"
fi
mkdir -p build
if ! PAGEDKV_TESTS=ON python3 -m pip install --no-build-isolation --no-deps -v . >build/install.log 2>&1; then
  tail -60 build/install.log
  echo "tests/run.sh: building pagedkv failed (full log: build/install.log)" >&2
  exit 1
fi
grep -E "pagedkv:" build/install.log || true
python3 -c "import pagedkv; print('pagedkv', pagedkv.__version__, 'built with CUDA:', pagedkv.built_with_cuda(), '| GPU usable:', pagedkv.cuda_available())"

ctest --test-dir build/py --output-on-failure -j2
python3 -m pytest tests/python -q "$@"
