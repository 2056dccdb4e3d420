"""Where code runs and how: device choice, precision, how the model is compiled and a damaged
torch.compile cache, synchronisation, peak memory, the signals that stop a run, collectives across
torchrun processes, and atomic file writes.
Each of these lives here and nowhere else.

Precision has one vocabulary everywhere (recipes, `train`, `eval`, `bench`, `profile`):
`fp32` (no autocast), `bf16` or `fp16` (autocast to that type; fp16 only on CUDA), or `auto`:
bf16 where the device multiplies bf16 matrices natively (a CPU with AMX, a CUDA device of compute
capability 8 or more), else fp32 (`resolve_precision`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import resource
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

from debiformer.errors import UserError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO_PRECISION = "auto"
PRECISION_CHOICES = (*PRECISIONS, AUTO_PRECISION)
DEVICES = ("auto", "cpu", "cuda")


# ----------------------------------------------------------------------------- device, precision


def select_device(choice: str | None = "auto", *, option: str = "device") -> torch.device:
    """This process's device: `cuda:LOCAL_RANK` for "cuda", or "auto"/None when CUDA is present,
    else the CPU. `option` is what a `UserError` is about: the parameter or recipe key
    (`train.device`) that gave `choice`."""
    choice = choice or "auto"
    if choice not in DEVICES:
        raise UserError(
            f": unknown device {choice!r}; choose one of {', '.join(DEVICES)}", about=option
        )
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError(": cuda requested but no CUDA device is available; use cpu", about=option)
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def check_precision(precision: str, device: torch.device, *, option: str = "precision") -> None:
    """Rejects a precision that does not exist or that `device` cannot autocast to, with a
    `UserError` about `option`: the parameter or recipe key (`train.precision`) that gave it."""
    if precision not in PRECISION_CHOICES:
        raise UserError(
            f": unknown precision {precision!r}; choose one of {', '.join(PRECISION_CHOICES)}",
            about=option,
        )
    if precision == "fp16" and device.type != "cuda":
        raise UserError(": fp16 needs a CUDA device; use bf16 or fp32 on the CPU", about=option)


def _cpu_capabilities() -> dict[str, bool] | None:
    """torch's probe of this CPU's features (`torch.cpu.get_capabilities`), or None on torch
    releases without it."""
    probe = getattr(torch.cpu, "get_capabilities", None)
    return None if probe is None else probe()


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX for bf16 (Intel Sapphire Rapids and later), where oneDNN
    multiplies bf16 matrices several times faster than fp32. False where torch cannot tell."""
    capabilities = _cpu_capabilities()
    return capabilities is not None and bool(capabilities.get("amx_bf16", False))


def cpu_converts_bf16() -> bool:
    """Whether this is an x86 CPU with neither AMX nor AVX512-BF16, where oneDNN converts bf16 to
    compute and bf16 runs slower than fp32 (DeBiFormer-T and Swin-T 2-3x slower on an Intel Ice
    Lake). False where torch cannot tell and off x86."""
    capabilities = _cpu_capabilities()
    if capabilities is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return not (capabilities.get("amx_bf16", False) or capabilities.get("avx512_bf16", False))


def _cpu_model() -> str:
    """The CPU's model name, as lscpu gives it (/proc/cpuinfo); `platform.processor()` off Linux."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict[str, Any]:
    """What a measurement ran on, for its record: the CPU's model, torch's CPU capability (the
    kernels it picks: DEFAULT, AVX2, AVX512...), whether the CPU has AMX, torch's threads and
    version, and the GPU's name on CUDA."""
    record = {
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx": cpu_has_amx(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def machine_text(record: dict[str, Any]) -> str:
    """`machine`'s record in words, as in "AMD EPYC (AVX512, no AMX), 2 threads, torch 2.14.1"."""
    amx = "AMX" if record["amx"] else "no AMX"
    text = f"{record['cpu']} ({record['cpu_capability']}, {amx}), {record['threads']} threads"
    if "gpu" in record:
        text = f"{record['gpu']}; {text}"
    return f"{text}, torch {record['torch']}"


def _auto_precision(device: torch.device) -> tuple[str, str]:
    """What "auto" is on `device`, and why: bf16 where the hardware multiplies bf16 matrices
    natively and fast, else fp32."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", "CUDA device with native bf16"
        return "fp32", "CUDA device without native bf16"
    if device.type == "cpu":
        return ("bf16", "CPU with AMX") if cpu_has_amx() else ("fp32", "CPU without AMX")
    return "fp32", f"{device.type} device"


def resolve_precision(precision: str, device: torch.device, *, option: str = "precision") -> str:
    """`precision` checked (`check_precision`) and made concrete for `device`: "auto" becomes
    bf16 or fp32, the others stay as they are."""
    check_precision(precision, device, option=option)
    return _auto_precision(device)[0] if precision == AUTO_PRECISION else precision


def precision_text(precision: str, device: torch.device) -> str:
    """`precision` for a notice: itself; for "auto" what it is on `device` and why, as in
    "auto → fp32 (CPU without AMX)"; for bf16 on a CPU without bf16 instructions, a warning that
    it runs slower than fp32 there."""
    if precision == "bf16" and device.type == "cpu" and cpu_converts_bf16():
        return "bf16 (slower than fp32 here: this CPU has no bf16 instructions)"
    if precision != AUTO_PRECISION:
        return precision
    resolved, reason = _auto_precision(device)
    return f"{AUTO_PRECISION} → {resolved} ({reason})"


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Mixed precision for bf16/fp16 on `device` (a precision as `resolve_precision` gives it);
    nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def synchronize(device: torch.device) -> None:
    """Waits for queued device work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- torch.compile


def compile_model(model: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """`torch.compile(model, mode=mode)` without inductor's layout optimisation, which lets it
    store the intermediates of a graph with convolutions in other memory orders. DeBiFormer's
    maps are NHWC already; with it, inductor stored DBRA's query-agent attention with the
    (image, head) index fastest, so that each batched product with it copied every matrix:
    DeBiFormer-T's compiled training step made 2,462 copies against eager's 682 and ran at 0.93x
    eager on a 2-core Intel Ice Lake, and at 1.02x without it (inference 0.98x and 1.09x)."""
    import torch._inductor

    options = {**torch._inductor.list_mode_options(mode), "layout_optimization": False}
    return torch.compile(model, options=options)


def _compile_cache_dir() -> str:
    """The folder of torch.compile's (inductor's) cache: TORCHINDUCTOR_CACHE_DIR, else
    torchinductor_<user> in the temporary folder. Unlike inductor's `cache_dir`, it creates
    nothing, so it can run while handling a full disk."""
    from torch._inductor.runtime.runtime_utils import default_cache_dir

    return os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())


def _compile_cache_load_error(error: BaseException) -> BaseException | None:
    """The ImportError or OSError in `error`'s chain (causes and contexts: dynamo raises the
    backend's error as the context of its own) that names a file of the compile cache, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        loads = isinstance(error, (ImportError, OSError))
        if loads and os.path.join(_compile_cache_dir(), "") in str(error):
            return error
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def compile_cache_errors(setting: str) -> Iterator[None]:
    """Runs the block, in which a compiled model may compile or load its code, turning a file of
    the compile cache that does not load (a cache a killed run left truncated) into a one-line
    `UserError` naming the folder to delete; `setting` is what compiles the model (`train.compile`,
    or a mention), named as the other way out. Any other error passes unchanged."""
    try:
        yield
    except Exception as error:
        cause = _compile_cache_load_error(error)
        if cause is None:
            raise
        detail = " ".join(f"{type(cause).__name__}: {cause}".split())
        raise UserError(
            f"torch.compile's cache is damaged ({detail}), as a killed run can leave it: delete "
            f"{_compile_cache_dir()} and run again, or run without {setting}"
        ) from None


# ----------------------------------------------------------------------------- host memory

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Has glibc's malloc keep the memory this process frees for its next allocations, instead
    of handing large blocks back to the system (no mmap for blocks up to 1 GiB, no trimming).

    A training step on the CPU frees and reallocates hundreds of MB of activations. Memory
    handed back returns as fresh pages, each a page fault that the kernel zeroes: 137,000 per
    step of DeBiFormer-T at 224², batch 8 (about 550 MB), none with this setting, for a
    10-30% faster step (docs/results.md). The peak is unchanged; what is freed after it stays
    with the process until it ends. False where it does not apply (not Linux with glibc)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 2**30)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    )


# ----------------------------------------------------------------------------- peak memory


def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM") in MB; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    """Resets this process's peak RSS (VmHWM) to its current RSS; False where Linux can't."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _proc_status_mb("VmHWM") is not None


def _ru_maxrss_mb() -> float:
    """Process-lifetime peak RSS in MB (`ru_maxrss` is kB on Linux, bytes on macOS)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yields a dict whose "mb" is set on exit to the peak memory the block added.

    CUDA: the allocator's maximum minus what was allocated before. CPU: the peak resident set
    size minus the RSS before, after resetting the peak (Linux); elsewhere the rise of the
    lifetime peak `ru_maxrss`, which stays 0 until an earlier, higher peak is passed.
    """
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device) / 2**20
        yield result
        result["mb"] = torch.cuda.max_memory_allocated(device) / 2**20 - start
    elif _reset_cpu_peak():
        start = _proc_status_mb("VmRSS")
        yield result
        result["mb"] = _proc_status_mb("VmHWM") - start
    else:
        start = _ru_maxrss_mb()
        yield result
        result["mb"] = _ru_maxrss_mb() - start


# ----------------------------------------------------------------------------- stop signals

# what stops a run after its current step, with a checkpoint: Ctrl-C, a scheduler's TERM, and the
# USR1 that Slurm sends before a job's time runs out (`#SBATCH --signal=USR1@120`)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int) -> None:
    """A data loader worker's init: the stop signals are the main process's to act on, which ends
    its workers itself. `timeout`, Slurm and `kill -- -PGID` signal the whole process group, and a
    worker that died of a TERM or USR1 would end the run with the DataLoader's error instead of
    a checkpoint."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


# ----------------------------------------------------------------------------- collectives


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "node07" of "node[07-09,12],gpu3"."""
    head = re.match(r"[^,\[]*(\[[^\]]*\])?", nodelist.strip()).group(0)
    if "[" not in head:
        return head
    prefix, ranges = head[:-1].split("[", 1)
    return prefix + re.split(r"[,-]", ranges)[0]


def slurm_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables that a task of a Slurm job of several tasks implies
    (`srun debiformer train ...`, one task per GPU or CPU process): RANK, LOCAL_RANK and
    WORLD_SIZE from SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS; MASTER_ADDR, where not set,
    the first host of SLURM_JOB_NODELIST; MASTER_PORT, where not set, 20000 + the job id modulo
    20000 (the same on every task of a job). Empty outside such a job, and under torchrun
    (RANK already set)."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    world_size = int(environ.get("SLURM_NTASKS", "1"))
    if world_size < 2:
        return {}
    variables = {
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": str(world_size),
    }
    if "MASTER_ADDR" not in environ:
        variables["MASTER_ADDR"] = first_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    if "MASTER_PORT" not in environ:
        variables["MASTER_PORT"] = str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
    return variables


def adopt_slurm_environment() -> None:
    """Sets the variables `slurm_environment` gives for this process, so that a Slurm job's
    tasks join one process group as torchrun's workers do."""
    os.environ.update(slurm_environment(os.environ))


def is_distributed() -> bool:
    """True inside a torchrun job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_process_group(device: torch.device) -> None:
    """Joins the torchrun job (NCCL on GPUs, gloo on the CPU), keying the rendezvous by restart
    attempt: torchrun keeps its store when it restarts the workers, and restarted workers must
    not read the dead ones' addresses."""
    store, rank, world_size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"debiformer/attempt_{attempt}", store)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


def barrier() -> None:
    """Waits for every rank (nothing outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather(value: Any) -> list[Any]:
    """`value` from every rank, in rank order."""
    if rank_and_world()[1] == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast(value: Any) -> Any:
    """Rank 0's `value`, on every rank."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar tensor over ranks, as a Python float (a host sync)."""
    if rank_and_world()[1] > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` summed element-wise over ranks (in place)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(values)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if `flag` is set on any rank (every rank gets the same answer)."""
    if rank_and_world()[1] == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# ----------------------------------------------------------------------------- files


TEMP_MARK = ".tmp-"


def _is_disk_full(error: BaseException | None) -> bool:
    """True when `error`, or an error it was raised while handling, says the disk is full (or
    the quota spent): torch's zip writer, for one, raises a RuntimeError while handling the
    OSError."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _size_text(size: int) -> str:
    """`size` bytes for people: "3.2 GB", "41.0 MB", "12.5 kB" or "80 bytes"."""
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} bytes"


def _disk_full_error(path: Path, size: int | None) -> UserError:
    """The one line for a write of `path` that found its disk full: the folder, the space the
    file needs (`size` bytes, else the size of the file it replaces, where known) and the space
    left there."""
    folder = path.parent
    if size is None and path.is_file():
        size = path.stat().st_size
    needs = f" (about {_size_text(size)})" if size else ""
    kept = f"; the earlier {path.name} is kept" if path.exists() else ""
    return UserError(
        f"no space left to write {path}{needs}: {folder} has "
        f"{_size_text(shutil.disk_usage(folder).free)} free; free space there and run "
        f"again{kept}"
    )


@contextmanager
def atomic_writer(
    path: str | os.PathLike, mode: str = "w", *, size: int | None = None
) -> Iterator[IO]:
    """Opens a temporary file beside `path` for writing; on success it is flushed, synced and
    renamed to `path`, so readers see the old file or the whole new one, never a part.
    On failure the temporary file is removed and `path` is untouched; a disk that fills on the
    way is a one-line `UserError` naming the folder, the space the file needs (`size` bytes,
    where known) and the space left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with open(tmp, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except Exception as error:
        tmp.unlink(missing_ok=True)  # before the free space is measured
        if _is_disk_full(error):
            raise _disk_full_error(path, size) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Appends `line` and a newline to the file at `path`, whole or not at all: a write that
    fails (a full disk is the one-line `UserError` of `atomic_writer`) leaves the file as it
    was."""
    path = Path(path)
    with open(path, "a") as file:
        start = file.tell()
        try:
            file.write(line + "\n")
            file.flush()
        except OSError as error:
            file.truncate(start)
            if _is_disk_full(error):
                raise _disk_full_error(path, len(line) + 1) from None
            raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_writer(path) as file:
        file.write(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Writes `data` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Removes temporary files that killed atomic writes left in `folder`; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    # hidden files named by `atomic_writer`, or `.NAME.PID.tmp` as earlier versions named them
    stale = [
        path
        for path in folder.iterdir()
        if path.name.startswith(".") and (TEMP_MARK in path.name or path.name.endswith(".tmp"))
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def check_writable(path: str | os.PathLike, about: str) -> Path:
    """`path` as a file that can be written (its folder exists or can be made, and is writable;
    the path is not a directory), checked before any work; if not, a `UserError` about `about`,
    the parameter (`json_path`) or recipe key that gave the path."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name", about=about)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{path}: cannot create {folder} ({error.strerror})", about=about) from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".probe{TEMP_MARK}"):
            pass
    except OSError as error:
        raise UserError(
            f"{path}: {folder} is not writable ({error.strerror})", about=about
        ) from None
    return path
