#!/usr/bin/env bash
# The check of a machine with one CUDA GPU, in under 8 minutes on an H200: the tests marked `cuda`
# (tests/test_cuda.py and one in tests/tasks), then `debiformer bench` of DeBiFormer-T/S/B next to
# Swin-T and ConvNeXt-T in bf16 at 224², inference and training, eager and torch.compile. Writes
# into OUT (default gpu_check/):
#
#   gpu_check.json  the machine (nvidia-smi, torch, CUDA, device), the tests' outcome, each bench
#                   part's status and time, and every bench record (fields as `bench --json`)
#   tests.log, compile_test.log, bench.log, nvidia-smi.txt
#
# Steps, most important first, each within what is left of the budget (GPU_CHECK_BUDGET_S, default
# 420 s): the tests but the compile one; every model eager; DeBiFormer-T compiled, then compiled
# with CUDA graphs (`--runtime cudagraphs`), inference and training; the two timm models compiled;
# DeBiFormer-T eager with the release's routed attention and with NHWC inputs; the compile test (a
# cold compile of a small model's forward and backward takes minutes); then compiled DeBiFormer-S
# and -B. Cold compiles take minutes each (an H200's host: DeBiFormer-T, Swin-T and ConvNeXt-T
# for inference in 134 s; their training did not fit in 172 s), so the default budget reaches
# DeBiFormer-T's compiled parts and not S's or B's. A step that would not fit in the time left is
# skipped and gpu_check.json says so. Exits 0 only when every test passed and every part ran.
# Needs debiformer installed in $PYTHON (default .venv/bin/python, else python3).
#
# `--device cpu` is a dry run of the same steps on the CPU, at 64² and batch 2 with one timed step
# (the `cuda` tests are collected and skip, as do the CUDA-graph parts; compiled parts the budget
# leaves no time for are skipped).
#
#   bash benchmarks/gpu_check.sh [--device cpu] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
if [ "${1:-}" = "--device" ]; then
    device=${2:-}
    shift 2 || shift
fi
case $device in
    cuda | cpu) ;;
    *) echo "error: --device takes cuda (the default) or cpu (a dry run), not '$device'" >&2; exit 2 ;;
esac
out="${1:-gpu_check}"
if [ -n "${PYTHON:-}" ]; then python=$PYTHON
elif [ -x .venv/bin/python ]; then python=.venv/bin/python
else python=python3; fi
budget_s=${GPU_CHECK_BUDGET_S:-420}  # the whole script; a step's limit is what is left of it
tests_limit_s=120   # the tests but the compile one (45 s on an H200)
min_part_s=45       # a step is not started with less time left than this
if [ "$device" = cuda ]; then
    bench=(--device cuda --precision bf16 --resolution 224 --batch-size 64 --warmup 3 --iterations 10)
else
    bench=(--device cpu --precision bf16 --resolution 64 --batch-size 2 --warmup 1 --iterations 1)
fi
compare=swin_tiny_patch4_window7_224,convnext_tiny
export PYTHONUNBUFFERED=1

# One line and exit 1 where there is no GPU, or the package or one it needs is missing.
"$python" -W ignore - "$python" "$device" <<'EOF' || exit 1
import sys

python, device = sys.argv[1:]
try:
    import torch
except ModuleNotFoundError:
    sys.exit(f"error: {python} has no torch; set PYTHON to the Python that holds PyTorch")
if device == "cuda" and not torch.cuda.is_available():
    sys.exit(
        f"error: no CUDA GPU visible to {python} (torch {torch.__version__}: "
        "torch.cuda.is_available() is False); run this on a machine with an NVIDIA GPU, "
        "or add --device cpu for a dry run"
    )
try:
    import debiformer.cli.main
    import debiformer.tools.bench
    import pytest
    import skimage  # the photographs of the engine test's image folder
except ModuleNotFoundError as error:
    if (error.name or "").startswith("debiformer"):
        sys.exit(
            f"error: debiformer is not installed in {python}; install this checkout first: "
            f"{python} -m pip install --no-deps --no-build-isolation -e ."
        )
    sys.exit(
        f"error: {python} lacks {error.name!r}, which debiformer or its tests need; install it "
        "(offline: carry its wheel and pip install it with --no-index)"
    )
EOF

mkdir -p "$out"
parts=$(mktemp -d)
trap 'rm -rf "$parts"' EXIT
# a compile cache of this run alone: a part stopped mid-compile cannot leave a damaged one to
# the next part or run (compile times are cold ones)
export TORCHINDUCTOR_CACHE_DIR="$parts/inductor"
if command -v nvidia-smi >/dev/null; then
    { nvidia-smi && nvidia-smi --format=csv \
        --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit; } \
        >"$out/nvidia-smi.txt" 2>&1 || true
else echo "nvidia-smi: not found" >"$out/nvidia-smi.txt"; fi
: >"$out/bench.log"

# record_status NAME STATUS START: appends NAME, its status and its seconds since START to
# $parts/status.tsv
record_status() {
    printf '%s\t%s\t%s\n' "$1" "$2" "$((SECONDS - $3))" >>"$parts/status.tsv"
}

# run_step NAME LOG LIMIT COMMAND...: COMMAND within LIMIT seconds or what is left of the budget
# (the smaller), its output appended to OUT/LOG, its status recorded (done, failed, timed out, or
# skipped where less than `min_part_s` is left)
run_step() {
    local name=$1 log=$2 limit=$3 left=$((budget_s - SECONDS)) rc=0 start=$SECONDS
    shift 3
    echo "== $name ($log)"
    if [ "$left" -lt "$min_part_s" ]; then
        record_status "$name" "skipped: $left s of the $budget_s s budget left" "$start"
        echo "skipped: ${left} s left" | tee -a "$out/$log"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name: $*" >>"$out/$log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$out/$log" || rc=$?
    case $rc in
        0) record_status "$name" "done" "$start" ;;
        124 | 137) record_status "$name" "timed out after $limit s" "$start" ;;
        *) record_status "$name" "failed: exit code $rc" "$start" ;;
    esac
}

# part NAME ARGS...: `debiformer bench ARGS` into $parts/NAME.json, a step of bench.log
part() {
    local name=$1
    shift
    run_step "$name" bench.log "$budget_s" "$python" -m debiformer.cli.main bench "$@" \
        "${bench[@]}" --json "$parts/$name.json"
}

cuda_tests=(-m pytest -q -m cuda tests/test_cuda.py tests/tasks/test_segmentation_metrics.py)
: >"$out/tests.log"
: >"$out/compile_test.log"
run_step tests tests.log "$tests_limit_s" "$python" "${cuda_tests[@]}" -k "not torch_compile"
part eager --models debiformer_tiny,debiformer_small,debiformer_base --compare "$compare" \
    --runtime eager --mode both
part compile_tiny --models debiformer_tiny --runtime compile --mode both
# the same kernels launched as one CUDA graph per step: what the CPU's dispatching costs
if [ "$device" = cuda ]; then
    part cudagraphs_tiny --models debiformer_tiny --runtime cudagraphs --mode both
else
    record_status cudagraphs_tiny "not on a CPU: CUDA graphs need a GPU" "$SECONDS"
fi
part compile_compare --models '' --compare "$compare" --runtime compile --mode both
# what a GPU's DeBiFormer-T might run instead: the release's routed attention (one gather of the
# k regions, few and large kernels, where the fast path's slot-by-slot products bound CPU memory)
# and NHWC inputs
part reference_tiny --models debiformer_tiny --impl reference --runtime eager --mode both
part channels_last_tiny --models debiformer_tiny --channels-last --runtime eager --mode both
run_step compile_test compile_test.log "$budget_s" "$python" "${cuda_tests[@]}" -k torch_compile
part compile_infer_small --models debiformer_small --runtime compile --mode infer
part compile_infer_base --models debiformer_base --runtime compile --mode infer
part compile_train_small --models debiformer_small --runtime compile --mode train
part compile_train_base --models debiformer_base --runtime compile --mode train

commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
"$python" -W ignore - "$out" "$parts" "$commit" "${bench[*]}" "$device" <<'EOF'
"""Writes OUT/gpu_check.json from the machine, the tests' logs and the bench parts; prints what
is incomplete and exits 1 if anything is."""

import datetime
import json
import platform
import sys
from pathlib import Path

import timm
import torch

import debiformer
from debiformer.runtime import machine, write_json

out, parts, commit, settings, device = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]
TESTS = {  # the test steps and their logs
    "tests": "tests.log",
    "compile_test": "compile_test.log",
}
tests, bench_parts, records = [], [], []
for line in (parts / "status.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    step = {"name": name, "status": status, "seconds": int(seconds)}
    if name in TESTS:
        log_lines = (out / TESTS[name]).read_text().strip().splitlines()
        tests.append({**step, "summary": log_lines[-1] if log_lines else ""})
        continue
    bench_parts.append(step)
    if status == "done":
        records += json.loads((parts / f"{name}.json").read_text())
gpu = {}
if device == "cuda":
    gpu = {
        "device": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
result = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": commit,
    **gpu,
    "machine": machine(torch.device(device)),
    "torch": torch.__version__,
    "python": platform.python_version(),
    "timm": timm.__version__,
    "debiformer": debiformer.__version__,
    "nvidia_smi": (out / "nvidia-smi.txt").read_text(),
    "tests_command": "pytest -q -m cuda tests/test_cuda.py tests/tasks/test_segmentation_metrics.py",
    "tests": tests,
    "bench_settings": settings,
    "bench_parts": bench_parts,
    "records": records,
}
write_json(out / "gpu_check.json", result)
incomplete = [f"{step['name']} {step['status']}" for step in tests + bench_parts]
incomplete = [text for text in incomplete if not text.endswith((" done", "need a GPU"))]
print(f"wrote {out / 'gpu_check.json'}: {len(records)} bench records")
if incomplete:
    sys.exit("incomplete: " + "; ".join(incomplete))
EOF
