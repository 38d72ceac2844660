#!/usr/bin/env bash
# The paper's 3-D Glow (preset paper-bct) through `training experiment` on one GPU machine, one command:
#   bash scripts/gpu_experiment.sh [OUT]        (default OUT: runs/paper-bct)
# Sizes come from the preset's experiment_* keys (training/presets.toml): synthesis and assembly on every
# core, a trunk of 1,200 steps and two branches of 600, the same report as the CPU experiment, then the
# Glow bench (paper-bct time per volume, largest batch in bf16 and fp32) beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/paper-bct}
bash scripts/bootstrap.sh
.venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this script is for a GPU machine")'
.venv/bin/python -m training.experiment --preset paper-bct --no-compare-scratch --out "$OUT"
.venv/bin/python bench/glow_bench.py --presets paper-bct --variants fp32,bf16 --out "$OUT/glow-bench.json"
