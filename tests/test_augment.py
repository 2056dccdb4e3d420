"""Device augmentations: RandAugment specs parse like timm's, each op matches timm's PIL op on a
photograph, RandAugment changes images inside the normalised range, and random erasing fills
one rectangle of each image."""

import numpy as np
import pytest
import torch

from debiformer.augment import RandAugmentConfig, rand_augment_ops
from debiformer.data.loaders import AugmentOptions
from tests.data.common import NORMALISED_RANGE, make_loader


def first_batch(**augment) -> torch.Tensor:
    """The first training batch of a seeded synthetic loader, with `augment` on top of the
    default flips."""
    loader = make_loader(
        "train", "synthetic", None, num_classes=2, augment=AugmentOptions(**augment)
    )
    images, _ = next(iter(loader))
    return images


def test_rand_augment_changes_images_inside_the_normalised_range():
    clean = first_batch()
    changed = first_batch(randaugment="rand-m9-mstd0.5-inc1")
    assert clean.shape == changed.shape and changed.dtype == torch.float32
    assert not torch.equal(clean, changed)
    assert NORMALISED_RANGE[0] <= changed.min() and changed.max() <= NORMALISED_RANGE[1]


def test_random_erasing_fills_one_rectangle_of_each_image_and_leaves_the_rest():
    clean, erased = first_batch(), first_batch(random_erasing=1.0)
    for image, (before, after) in enumerate(zip(clean, erased, strict=True)):
        changed = (before != after).any(dim=0)
        rows, columns = changed.nonzero(as_tuple=True)
        assert 0 < len(rows) < changed.numel(), image
        box = changed[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
        assert box.all(), image


def test_rand_augment_spec_parses_like_timm():
    config = RandAugmentConfig.parse("rand-m9-mstd0.5-inc1")
    parsed = (config.magnitude, config.magnitude_std, config.increasing, config.num_ops)
    assert parsed == (9, 0.5, True, 2)


@pytest.mark.parametrize("increasing", [True, False])
def test_device_rand_augment_ops_match_timm_on_a_photograph(increasing, monkeypatch):
    import skimage.data
    import timm.data.auto_augment as timm_aa
    from PIL import Image

    monkeypatch.setattr(timm_aa, "_randomly_negate", lambda value: value)
    photo = Image.fromarray(skimage.data.chelsea()).resize((96, 64))
    batch = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None]
    increasing_names = {"Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"}
    for name, op in rand_augment_ops(increasing).items():
        timm_name = name + ("Increasing" if increasing and name in increasing_names else "")
        reference = timm_aa.AugmentOp(
            timm_name,
            prob=1.0,
            magnitude=9,
            hparams={"img_mean": (124, 116, 104), "interpolation": Image.BILINEAR},
        )
        expected = torch.from_numpy(np.array(reference(photo))).permute(2, 0, 1).float()
        result = op(batch, torch.tensor([0.9]), torch.tensor([1.0]))[0].float()
        # pointwise ops match exactly (+-1 rounding), geometric ones differ at a few edge pixels
        assert (result - expected).abs().mean() < 1.0, name
