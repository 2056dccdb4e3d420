"""Image data for training and evaluation: sources, FFCV files, device loaders, benchmark."""

from debiformer.data.bench import bench_loaders
from debiformer.data.ffcv_files import (
    Conversion,
    FileSummary,
    WriterOptions,
    convert_to_ffcv,
    ensure_ffcv_file,
    fashion_mnist_paths,
    ffcv_summary,
    inspect_ffcv_file,
)
from debiformer.data.loaders import Loader, ShardPlan, build_loader
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
    "FashionMNIST",
    "FileSummary",
    "ImageFolder",
    "Loader",
    "ShardPlan",
    "WriterOptions",
    "bench_loaders",
    "build_loader",
    "convert_to_ffcv",
    "ensure_ffcv_file",
    "fashion_mnist_paths",
    "ffcv_summary",
    "inspect_ffcv_file",
    "make_photo_folder",
    "read_fashion_mnist",
]
