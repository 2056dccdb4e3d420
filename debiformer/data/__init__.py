"""Image data for training and evaluation: sources, FFCV files, device loaders."""

from debiformer.data.ffcv_files import (
    Conversion,
    FileSummary,
    WriterOptions,
    classes_path,
    convert_to_ffcv,
    ensure_ffcv_file,
    fashion_mnist_paths,
    ffcv_summary,
    inspect_ffcv_file,
)
from debiformer.data.loaders import EpochLoader, Loader, ShardPlan, build_loader, check_labels
from debiformer.data.sources import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_PREFIX,
    FashionMNIST,
    ImageFolder,
    make_photo_folder,
    read_fashion_mnist,
)

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_PREFIX",
    "Conversion",
    "EpochLoader",
    "FashionMNIST",
    "FileSummary",
    "ImageFolder",
    "Loader",
    "ShardPlan",
    "WriterOptions",
    "build_loader",
    "check_labels",
    "classes_path",
    "convert_to_ffcv",
    "ensure_ffcv_file",
    "fashion_mnist_paths",
    "ffcv_summary",
    "inspect_ffcv_file",
    "make_photo_folder",
    "read_fashion_mnist",
]


def __getattr__(name: str):
    """`bench_loaders`, imported from `debiformer.tools.loader_bench` on first use (training code
    imports this package and never the tools)."""
    if name == "bench_loaders":
        from debiformer.tools.loader_bench import bench_loaders

        return bench_loaders
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
