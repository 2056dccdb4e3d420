"""Time a DeBiFormer training step (forward + backward + AdamW) on random data and report
images/s and the process's peak memory: its whole peak resident set, and that peak's rise over
the process's size before the model was built (torch, torchvision and timm imported). One
implementation per process, so that peak memory belongs to it alone; `--impl both` runs each in
a fresh subprocess and prints both.

    python benchmarks/train_step.py --model debiformer_tiny --batch-size 8 --resolution 224 --impl both
    python benchmarks/train_step.py --impl fast --grad-checkpointing 1,3
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

import debiformer
from debiformer.routing import implementation


def measure(
    model_name: str,
    batch_size: int,
    resolution: int,
    impl: str,
    steps: int,
    warmup: int,
    grad_checkpointing: list[int],
) -> dict:
    """Images/s and peak resident memory of `steps` timed training steps after `warmup` ones."""
    import_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    model = debiformer.create_model(model_name).train()
    model.set_grad_checkpointing(bool(grad_checkpointing), stages=grad_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 3, resolution, resolution)
    labels = torch.randint(0, 1000, (batch_size,))
    times = []
    with implementation(impl):
        for step in range(warmup + steps):
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= warmup:
                times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "model": model_name,
        "impl": impl,
        "grad_checkpointing": grad_checkpointing,
        "batch_size": batch_size,
        "resolution": resolution,
        "threads": torch.get_num_threads(),
        "step_s_median": round(median, 3),
        "images_per_s": round(batch_size / median, 2),
        "peak_rss_mb": round(peak_mb, 1),
        "peak_rise_mb": round(peak_mb - import_peak_mb, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="debiformer_tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--impl", choices=["fast", "reference", "both"], default="both")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--grad-checkpointing",
        default="",
        help="stages (1-4) whose attention and MLP branches are recomputed in backward, e.g. 1,3",
    )
    args = parser.parse_args()
    stages = [int(stage) for stage in args.grad_checkpointing.split(",") if stage]
    if args.impl != "both":
        result = measure(
            args.model,
            args.batch_size,
            args.resolution,
            args.impl,
            args.steps,
            args.warmup,
            stages,
        )
        print(json.dumps(result))
        return
    results = []
    for impl in ("reference", "fast"):
        command = [sys.executable, __file__, "--impl", impl] + [
            f"--{name.replace('_', '-')}={value}"
            for name, value in vars(args).items()
            if name != "impl"
        ]
        results.append(
            json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        )
    for result in results:
        print(json.dumps(result))
    reference, fast = results
    speedup = fast["images_per_s"] / reference["images_per_s"]
    memory = fast["peak_rss_mb"] / reference["peak_rss_mb"]
    print(f"fast vs reference: {speedup:.2f}x images/s, {memory:.2f}x peak memory")


if __name__ == "__main__":
    main()
