#!/usr/bin/env bash
# hone's LM benchmark against PyTorch on CPU, in one run, with the machine's
# f32 matmul peak (hone's gemm and PyTorch's) at the benchmark's shapes.
# PyTorch goes into a virtualenv used only here (bench/.venv): the PyPI wheel is
# a CUDA build of about 2.8 GB with its nvidia packages, and runs on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x bench/.venv/bin/python ]; then
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install --quiet torch
fi
cargo build --release -p hone-bench
for threads in 2 1; do
  ./target/release/hone-bench lm --threads "$threads"
  echo
  ./target/release/hone-bench matmul --threads "$threads"
  echo
done
