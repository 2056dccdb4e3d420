#!/usr/bin/env bash
# The CPU fp32 figures of docs/results.md, measured with `debiformer bench` and
# `debiformer profile`. Run on a quiet machine from an installed checkout (./install.sh);
# tables go to stdout, JSON to benchmarks/results/ (or $RESULTS). About 10-15 minutes on 2 cores.
#
#   bash benchmarks/run_cli_benchmarks.sh | tee benchmarks/results/tables.txt
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
results="${RESULTS:-benchmarks/results}"
mkdir -p "$results"
debiformer() { "$python" -m debiformer.cli.main "$@"; }
cpu=(--device cpu --precision fp32 --resolution 224 --batch-size 8 --warmup 1 --iterations 3)
step=(--device cpu --precision fp32 --resolution 224 --batch-size 8 --warmup 2 --iterations 7)

echo "== DeBiFormer-T training step: fast and reference routed attention"
time debiformer bench "${step[@]}" --models debiformer_tiny --mode train --impl fast,reference \
    --json "$results/train_step_impl.json"

echo "== DeBiFormer-T training step, stages 1 and 3 recomputed in the backward pass"
time debiformer bench "${step[@]}" --models debiformer_tiny --mode train --grad-checkpointing 1,3 \
    --json "$results/train_step_checkpointing_1_3.json"

echo "== DeBiFormer-T training step, every stage recomputed in the backward pass"
time debiformer bench "${step[@]}" --models debiformer_tiny --mode train \
    --grad-checkpointing 1,2,3,4 --json "$results/train_step_checkpointing_all.json"

echo "== DeBiFormer-T/S/B, inference and training"
time debiformer bench "${cpu[@]}" --mode both --json "$results/bench_variants.json"

echo "== fast vs reference routed attention, DeBiFormer-T training"
time debiformer bench "${cpu[@]}" --models debiformer_tiny --mode train --impl fast,reference \
    --json "$results/bench_impl.json"

echo "== DeBiFormer-T training with stages 1 and 3 recomputed in the backward pass"
time debiformer bench "${cpu[@]}" --models debiformer_tiny --mode train --grad-checkpointing 1,3 \
    --json "$results/bench_checkpointing.json"

echo "== DeBiFormer-T next to Swin-T and ConvNeXt-T"
time debiformer bench "${cpu[@]}" --models debiformer_tiny --mode both \
    --compare swin_tiny_patch4_window7_224,convnext_tiny --json "$results/bench_compare.json"

echo "== profile: DBRA of stage 1, DeBiFormer-T"
time debiformer profile --op dbra --stage 1 --variant debiformer_tiny --device cpu --precision fp32 \
    --resolution 224 --batch-size 8 --warmup 1 --iterations 3 \
    --json "$results/profile_dbra_stage1.json" --trace "$results/profile_dbra_stage1.trace.json"

echo "== profile: whole DeBiFormer-T"
time debiformer profile --op model --variant debiformer_tiny --device cpu --precision fp32 \
    --resolution 224 --batch-size 8 --warmup 1 --iterations 2 --json "$results/profile_model.json"
