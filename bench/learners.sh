#!/usr/bin/env bash
# hone's DPO and PPO training steps against the same losses in PyTorch on CPU,
# in one run. PyTorch goes into bench/.venv, as for bench/lm.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x bench/.venv/bin/python ] || ! bench/.venv/bin/python -c "import torch" 2>/dev/null; then
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install --quiet torch
fi
cargo build --release -p hone-bench
for threads in 2 1; do
  ./target/release/hone-bench learners --threads "$threads"
  echo
done
