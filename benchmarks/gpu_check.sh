#!/usr/bin/env bash
# The check of a machine with one CUDA GPU, in under 8 minutes on an H200: the tests marked `cuda`
# (tests/test_cuda.py and one in tests/tasks), then `debiformer bench` of DeBiFormer-T/S/B next to Swin-T and ConvNeXt-T
# in bf16 at 224², inference and training, eager and torch.compile. Writes into OUT (default
# gpu_check/):
#
#   gpu_check.json  the machine (nvidia-smi, torch, CUDA, device), the tests' outcome, each bench
#                   part's status and time, and every bench record (fields as `bench --json`)
#   tests.log, bench.log, nvidia-smi.txt
#
# The bench runs in parts, most important first: eager (every model), then compiled, one part per
# model and mode (Swin-T and ConvNeXt-T ride with DeBiFormer-T). A part that would not fit in the
# time left is skipped and gpu_check.json says so. Exits 0 only when every test passed and every
# part ran. Needs debiformer installed in $PYTHON (default .venv/bin/python, else python3).
#
#   bash benchmarks/gpu_check.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
if [ -n "${PYTHON:-}" ]; then python=$PYTHON
elif [ -x .venv/bin/python ]; then python=.venv/bin/python
else python=python3; fi
budget_s=420        # the whole script; each part's time limit is what is left of it
tests_limit_s=180
min_part_s=45       # a bench part is not started with less time left than this
bench=(--device cuda --precision bf16 --resolution 224 --batch-size 64 --warmup 3 --iterations 10)
compare=swin_tiny_patch4_window7_224,convnext_tiny
export PYTHONUNBUFFERED=1

# One line and exit 1 where there is no GPU, or the package or one it needs is missing.
"$python" -W ignore - "$python" <<'EOF' || exit 1
import sys

python = sys.argv[1]
try:
    import torch
except ModuleNotFoundError:
    sys.exit(f"error: {python} has no torch; set PYTHON to the Python that holds PyTorch")
if not torch.cuda.is_available():
    sys.exit(
        f"error: no CUDA GPU visible to {python} (torch {torch.__version__}: "
        "torch.cuda.is_available() is False); run this on a machine with an NVIDIA GPU"
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

echo "== tests marked cuda (tests.log)"
start=$SECONDS
tests_rc=0
timeout -k 10 "$tests_limit_s" "$python" -m pytest -q -m cuda tests/test_cuda.py tests/tasks/test_segmentation_metrics.py \
    2>&1 | tee "$out/tests.log" || tests_rc=$?
printf '%s\t%s\n' "$tests_rc" "$((SECONDS - start))" >"$parts/tests.status"

# part NAME ARGS...: `debiformer bench ARGS` into $parts/NAME.json within the time left; appends
# NAME, its status (done, failed, timed out or skipped) and its seconds to $parts/status.tsv
part() {
    local name=$1 left=$((budget_s - SECONDS)) rc=0 start=$SECONDS status
    shift
    echo "== bench $name (bench.log)"
    if [ "$left" -lt "$min_part_s" ]; then
        printf '%s\tskipped: %s s of the %s s budget left\t0\n' "$name" "$left" "$budget_s" \
            >>"$parts/status.tsv"
        echo "skipped: ${left} s left" | tee -a "$out/bench.log"
        return
    fi
    echo "== $name: debiformer bench $*" >>"$out/bench.log"
    timeout -k 10 "$left" "$python" -m debiformer.cli.main bench "$@" "${bench[@]}" \
        --json "$parts/$name.json" 2>&1 | tee -a "$out/bench.log" || rc=$?
    case $rc in
        0) status="done" ;;
        124 | 137) status="timed out after ${left} s" ;;
        *) status="failed: exit code $rc" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >>"$parts/status.tsv"
}

part eager --models debiformer_tiny,debiformer_small,debiformer_base --compare "$compare" \
    --runtime eager --mode both
part compile_infer_tiny --models debiformer_tiny --compare "$compare" --runtime compile --mode infer
part compile_train_tiny --models debiformer_tiny --compare "$compare" --runtime compile --mode train
part compile_infer_small --models debiformer_small --runtime compile --mode infer
part compile_infer_base --models debiformer_base --runtime compile --mode infer
part compile_train_small --models debiformer_small --runtime compile --mode train
part compile_train_base --models debiformer_base --runtime compile --mode train

commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
"$python" -W ignore - "$out" "$parts" "$commit" "${bench[*]}" <<'EOF'
"""Writes OUT/gpu_check.json from the machine, the tests' log and the bench parts; prints what
is incomplete and exits 1 if anything is."""

import datetime
import json
import platform
import sys
from pathlib import Path

import timm
import torch

import debiformer
from debiformer.runtime import write_json

out, parts, commit, settings = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
properties = torch.cuda.get_device_properties(0)
tests_rc, tests_s = (parts / "tests.status").read_text().strip().split("\t")
log_lines = (out / "tests.log").read_text().strip().splitlines()
tests = {
    "command": "pytest -q -m cuda tests/test_cuda.py tests/tasks/test_segmentation_metrics.py",
    "exit_code": int(tests_rc),
    "summary": log_lines[-1] if log_lines else "",
    "seconds": int(tests_s),
}
bench_parts, records = [], []
for line in (parts / "status.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    bench_parts.append({"name": name, "status": status, "seconds": int(seconds)})
    if status == "done":
        records += json.loads((parts / f"{name}.json").read_text())
result = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": commit,
    "device": torch.cuda.get_device_name(0),
    "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
    "memory_gib": round(properties.total_memory / 2**30, 1),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version(),
    "python": platform.python_version(),
    "timm": timm.__version__,
    "debiformer": debiformer.__version__,
    "nvidia_smi": (out / "nvidia-smi.txt").read_text(),
    "tests": tests,
    "bench_settings": settings,
    "bench_parts": bench_parts,
    "records": records,
}
write_json(out / "gpu_check.json", result)
incomplete = [f"{part['name']} {part['status']}" for part in bench_parts if part["status"] != "done"]
if tests["exit_code"] != 0:
    incomplete.insert(0, f"tests exit code {tests['exit_code']} ({tests['summary']})")
print(f"wrote {out / 'gpu_check.json'}: {len(records)} bench records")
if incomplete:
    sys.exit("incomplete: " + "; ".join(incomplete))
EOF
