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

# measure TITLE NAME ARGS...: prints TITLE, then times `debiformer ARGS --json $results/NAME.json`
measure() {
    local title=$1 name=$2
    shift 2
    echo "== $title"
    time debiformer "$@" --json "$results/$name.json"
}

measure "DeBiFormer-T training step: fast and reference routed attention" train_step_impl \
    bench "${step[@]}" --models debiformer_tiny --mode train --impl fast,reference
measure "DeBiFormer-T training step, stages 1 and 3 recomputed in the backward pass" \
    train_step_checkpointing_1_3 \
    bench "${step[@]}" --models debiformer_tiny --mode train --grad-checkpointing 1,3
measure "DeBiFormer-T training step, every stage recomputed in the backward pass" \
    train_step_checkpointing_all \
    bench "${step[@]}" --models debiformer_tiny --mode train --grad-checkpointing 1,2,3,4
measure "DeBiFormer-T/S/B, inference and training" bench_variants bench "${cpu[@]}" --mode both
measure "fast vs reference routed attention, DeBiFormer-T training" bench_impl \
    bench "${cpu[@]}" --models debiformer_tiny --mode train --impl fast,reference
measure "DeBiFormer-T training with stages 1 and 3 recomputed in the backward pass" \
    bench_checkpointing \
    bench "${cpu[@]}" --models debiformer_tiny --mode train --grad-checkpointing 1,3
measure "DeBiFormer-T next to Swin-T and ConvNeXt-T" bench_compare \
    bench "${cpu[@]}" --models debiformer_tiny --mode both \
    --compare swin_tiny_patch4_window7_224,convnext_tiny
measure "profile: DBRA of stage 1, DeBiFormer-T" profile_dbra_stage1 \
    profile --op dbra --stage 1 --variant debiformer_tiny --device cpu --precision fp32 \
    --resolution 224 --batch-size 8 --warmup 1 --iterations 3 \
    --trace "$results/profile_dbra_stage1.trace.json"
measure "profile: whole DeBiFormer-T" profile_model \
    profile --op model --variant debiformer_tiny --device cpu --precision fp32 \
    --resolution 224 --batch-size 8 --warmup 1 --iterations 2
