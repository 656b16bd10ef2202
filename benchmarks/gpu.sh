#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one command, on the first CUDA device:
# vit_b bf16 encoder images/s at batch 1..32 (eager and torch.compile) with peak memory,
# `samcache embed` and `samcache train` (box prompts, and SAM's interactive recipe) on 512 stamp pages;
# SAM 2.1's decoder step from the cache vs the frozen Hiera in the loop (Hiera-T, Hiera-L); vit_b's
# encoder-tail steps from cached tokens vs the encoder in the loop. Writes BENCHMARKS.md's GPU table,
# benchmarks/gpu-results.json, benchmarks/gpu-sam2-results.txt and benchmarks/gpu-tail-results.txt.
# Needs the README's install (`make install`) and a GPU.
#   bash benchmarks/gpu.sh            # about 15 minutes on one H100/H200
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this benchmark needs a GPU")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" benchmarks/bench_gpu.py --device cuda --write-benchmarks --json benchmarks/gpu-results.json "$@"
# SAM 2.1: decoder-training prompts/s from the cache vs the frozen Hiera in every step.
: > benchmarks/gpu-sam2-results.txt
for model in sam2.1_hiera_t sam2.1_hiera_l; do
  "$PY" benchmarks/bench_sam2_step.py --device cuda --model "$model" --pages 64 --batch-size 8 --rounds 3 \
    | tee -a benchmarks/gpu-sam2-results.txt
done
# Encoder tails: seconds per step from cached tokens vs the whole encoder in the loop, bf16.
"$PY" benchmarks/bench_tail_step.py --device cuda --precision bf16 --steps 5 --rounds 2 \
  --configs decoder,neck_k1,tail_k1,encoder_in_loop_k1,tail_k2,lora_k2,encoder_in_loop_k2 \
  | tee benchmarks/gpu-tail-results.txt
