"""The Task protocol: what a task gives the engine, and the metrics it declares once.

A task's `metrics` say how each validation metric is named and printed and whether higher is
better; `best_metric` names the one that picks best.pt (and that `debiformer plot` draws). The
engine, `debiformer eval`, `debiformer plot` and summary.json all read this one declaration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from debiformer.data.loaders import EpochLoader
    from debiformer.weights import ModelSpec


@dataclass(frozen=True)
class Metric:
    """One validation metric: its key in the metrics dict, how it is printed (`label` and a
    `str.format` template for the value), and whether a higher value is a better model."""

    key: str
    label: str
    format: str = "{:.4g}"
    higher_is_better: bool = True

    def show(self, value: float | None) -> str:
        """The metric as printed, e.g. 'top-1 81.25%'."""
        return f"{self.label} {'n/a' if value is None else self.format.format(value)}"

    def better(self, value: float, than: float | None) -> bool:
        """Whether `value` is better than `than` (any value is better than none)."""
        if than is None:
            return True
        return value > than if self.higher_is_better else value < than

    def best_of(self, values: list[float]) -> float:
        """The best of `values`."""
        return max(values) if self.higher_is_better else min(values)


class Task:
    """What a task gives the engine. Subclass it, declare `metrics` and `best_metric`, and
    implement the methods that raise.

    `batch` is whatever the task's loaders yield; the engine only moves it along and splits it
    into micro-batches with `x[k::n]` on each of its items (tensors and lists alike).
    """

    #: the validation metrics `evaluate` returns that are shown, in the order they are shown
    metrics: ClassVar[tuple[Metric, ...]] = ()
    #: the key of the metric in `metrics` that picks best.pt
    best_metric: ClassVar[str] = ""

    @classmethod
    def best(cls) -> Metric:
        """The declared metric that picks best.pt."""
        for metric in cls.metrics:
            if metric.key == cls.best_metric:
                return metric
        raise TypeError(
            f"{cls.__name__}.best_metric {cls.best_metric!r} is none of its declared metrics "
            f"({', '.join(metric.key for metric in cls.metrics) or 'none'})"
        )

    @classmethod
    def describe(cls, values: dict[str, Any]) -> str:
        """The declared metrics found in `values`, as printed: 'top-1 81.25%, top-5 95.00%'."""
        return ", ".join(
            metric.show(values[metric.key]) for metric in cls.metrics if metric.key in values
        )

    def prepare_data(self) -> None:
        """Makes the data ready to read (e.g. converts files); the engine calls it on rank 0
        only, before `build_loaders` on every rank. Nothing by default."""

    def build_loaders(
        self, device: torch.device, batch_size: int, eval_batch_size: int
    ) -> tuple[EpochLoader, EpochLoader]:
        """(train loader, validation loader) for this process. A loader has `len()` (batches per
        epoch) and `batches(epoch, start_batch)`, an iterator over that epoch's batches from
        `start_batch` on, the same batches whatever batch it starts at."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The network to train, on the CPU. Called after `build_loaders`, so it may use what
        the data says (e.g. the class count)."""
        raise NotImplementedError

    def model_spec(self) -> ModelSpec | None:
        """The spec of the network `build_model` builds, which every checkpoint stores so that
        the checkpoint alone rebuilds its model (`weights.build_model`); None where no spec
        describes it. Called after `build_loaders`."""
        return None

    def start_epoch(self, epoch: int) -> None:
        """Called before each training epoch (0-based); nothing by default."""

    def prepare_batch(self, batch: Any, generator: torch.Generator) -> Any:
        """The batch as the loss sees it (e.g. mixed up), drawing only from `generator`, which
        the engine seeds from (seed, epoch, rank, batch). The batch itself by default."""
        return batch

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The mean loss of `batch` (a scalar tensor with a graph)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: EpochLoader) -> dict[str, Any]:
        """Validation metrics of `model` over all ranks' shards of `loader`: at least every
        declared metric."""
        raise NotImplementedError
