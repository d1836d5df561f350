#!/usr/bin/env bash
# Builds hone's model plugins with `--features cuda`, using NVIDIA's CUDA
# compiler and headers from PyPI in a throw-away virtualenv: no system CUDA
# install, no root. Run by hand (CI does not: it has no GPU and the build
# takes many minutes). On a machine with a GPU, point a pipeline at the
# built plugins (`--plugin-path target/cuda/release`) and give the training
# and sampling stages `device = "cuda"`.
#
#   bench/cuda-build.sh                    # compute capability 9.0 (H100/H200)
#   CUDA_COMPUTE_CAP=80 bench/cuda-build.sh  # A100
#
# What it does:
#   1. a virtualenv in $VENV (default: a fresh temp dir) with the CUDA 13
#      wheels: nvidia-cuda-nvcc (nvcc, ptxas), nvidia-cuda-runtime,
#      nvidia-cublas, nvidia-curand and nvidia-cuda-cccl (headers); they all
#      unpack into one tree, site-packages/nvidia/cu13, used as CUDA_HOME;
#   2. cargo build of the lm and rm plugins (the stages that train and
#      sample) with their `cuda` feature, into target/cuda so the CPU build
#      in target/ is left alone. candle's kernels are compiled to PTX for
#      CUDA_COMPUTE_CAP (no GPU is needed to compile; one is needed to run).
#
# Status (2026-12-01, on a machine without a GPU): everything compiles,
# candle's kernels to PTX for compute capability 9.0 included, but the plugins
# fail to link: `unable to find library -lcuda`. libcuda.so is the GPU
# driver's, in no toolkit wheel. A machine with the NVIDIA driver has it; on
# one without, point LIBRARY_PATH at a stub libcuda.so.
#
# Why CUDA 13: the CUDA 12 wheels (nvidia-cuda-nvcc-cu12, 12.1 to 12.9) ship
# ptxas but no nvcc; the CUDA 13 nvidia-cuda-nvcc wheel has the compiler.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-$(mktemp -d)/cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
if [ ! -x "$VENV/bin/pip" ]; then
  python3 -m venv "$VENV"
fi
# 13.4: the newest CUDA that candle 0.11's cudarc (0.19) knows; with 13.5
# its build script stops at "Unsupported cuda toolkit version".
# nvcc's own parts (nvvm, crt, nvrtc) are separate wheels: pinned with it,
# or pip pulls the newest and ptxas refuses their PTX version.
"$VENV/bin/pip" install -q --disable-pip-version-check \
  "nvidia-cuda-nvcc==13.4.*" "nvidia-nvvm==13.4.*" "nvidia-cuda-crt==13.4.*" \
  "nvidia-cuda-nvrtc==13.4.*" "nvidia-cuda-runtime==13.4.*" "nvidia-cublas==13.*" \
  "nvidia-curand==10.*" "nvidia-cuda-cccl==13.*"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export CUDA_HOME="$SITE/nvidia/cu13"
export CUDA_PATH="$CUDA_HOME"
export PATH="$CUDA_HOME/bin:$PATH"
export LD_LIBRARY_PATH="$CUDA_HOME/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The wheels ship the libraries under their versioned names only; the
# linker looks for the plain ones.
for lib in cudart cublas cublasLt curand nvrtc; do
  so=$(ls "$CUDA_HOME/lib/lib$lib.so."* 2>/dev/null | head -1 || true)
  [ -n "$so" ] && [ ! -e "$CUDA_HOME/lib/lib$lib.so" ] && ln -s "$(basename "$so")" "$CUDA_HOME/lib/lib$lib.so"
done
nvcc --version | tail -1
echo "CUDA_HOME=$CUDA_HOME CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
CARGO_TARGET_DIR=target/cuda cargo build --release -p hone-lm -p hone-rm -p hone-bench \
  --features hone-lm/cuda,hone-rm/cuda,hone-models/cuda
echo "built: target/cuda/release/libhone_lm.so, libhone_rm.so (CUDA, compute capability $CUDA_COMPUTE_CAP)"
