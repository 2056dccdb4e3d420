"""The transfer demonstration on a small budget: a debiformer_nano pretrained on Fashion-MNIST
classes 0-4 fine-tunes to classes 5-9 better than the same recipe trains one from scratch."""

import pytest

from benchmarks.transfer import Budget, run_transfer
from debiformer.data import FASHION_MNIST_DIR
from debiformer.data.sources import fashion_mnist_root

pytestmark = pytest.mark.skipif(
    fashion_mnist_root(FASHION_MNIST_DIR) is None, reason="needs the Fashion-MNIST idx files"
)


def test_fine_tuning_beats_training_from_scratch_on_a_small_budget(tmp_path):
    top1 = run_transfer(
        tmp_path,
        pretrain=Budget(per_class=400, epochs=2, batch_size=64),
        finetune=Budget(per_class=10, epochs=10, batch_size=16),
        test_per_class=100,
    )
    assert top1["pretrain"] > 60
    assert top1["finetune"] > top1["scratch"] + 10, top1
