"""What keeping freed host memory (`debiformer.runtime.keep_freed_memory`) does to CPU training.

Times training steps (forward, cross-entropy, backward, AdamW) of each model with glibc's
default malloc and with freed memory kept, each in a fresh process, the two alternating for
`--rounds` rounds so that drifting machine load hits both. Per configuration: images/s, minor
page faults and system (kernel) CPU seconds per step, medians over the steps of the median round.

    python benchmarks/host_memory.py --models debiformer_tiny,swin_tiny_patch4_window7_224 \
        --precision fp32 --rounds 2 --json runs/host_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MALLOC = ("system", "kept")


def measure(model_name: str, precision: str, malloc: str, batch_size: int, steps: int) -> dict:
    """Steps of one model in this process; `malloc` "kept" calls `keep_freed_memory` first."""
    import timm
    import torch
    import torch.nn.functional as F

    import debiformer
    from debiformer.runtime import keep_freed_memory

    if malloc == "kept":
        keep_freed_memory()
    torch.manual_seed(0)
    if model_name.startswith("debiformer"):
        model = debiformer.create_model(model_name)
    else:
        model = timm.create_model(model_name)
    model = model.train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch_size,))

    def train_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        train_step()
    seconds, faults, system_s = [], [], []
    for _ in range(steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        train_step()
        seconds.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        system_s.append(after.ru_stime - before.ru_stime)
    return {
        "images_per_s": round(batch_size / statistics.median(seconds), 2),
        "minor_faults_per_step": int(statistics.median(faults)),
        "system_cpu_s_per_step": round(statistics.median(system_s), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="debiformer_tiny,swin_tiny_patch4_window7_224")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the records here")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MALLOC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        model_name, malloc = args.one
        result = measure(model_name, args.precision, malloc, args.batch_size, args.steps)
        print(json.dumps(result))
        return
    rounds: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for model_name in args.models.split(","):
            for malloc in MALLOC:
                command = [sys.executable, __file__, "--one", model_name, malloc]
                command += ["--precision", args.precision, "--batch-size", str(args.batch_size)]
                command += ["--steps", str(args.steps)]
                output = subprocess.run(command, check=True, capture_output=True, text=True)
                rounds.setdefault((model_name, malloc), []).append(json.loads(output.stdout))
    records = []
    for (model_name, malloc), results in rounds.items():
        median = sorted(results, key=lambda result: result["images_per_s"])[len(results) // 2]
        records.append(
            {"model": model_name, "precision": args.precision, "malloc": malloc, **median}
        )
        print(
            f"{model_name:30s} {args.precision} malloc {malloc:6s} {median['images_per_s']:6.2f} "
            f"img/s {median['minor_faults_per_step']:7d} faults/step "
            f"{median['system_cpu_s_per_step']:.3f} system s/step"
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(records, file, indent=2)


if __name__ == "__main__":
    main()
