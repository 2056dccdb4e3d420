"""RandAugment on uint8 image batches on the device, following timm's `rand-m9-mstd0.5-inc1` policy.

timm's RandAugment works on one PIL image at a time in the data workers. Here every image of a
batch draws its own ops, magnitudes and signs exactly as timm does, and each op runs once per
batch on the images that drew it, with per-image parameters, so it runs wherever the batch is.
Operation parameters follow timm's `auto_augment.py` (level denominator 10, translate 45%,
fill with the ImageNet mean for geometric ops); geometric ops sample bilinearly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from debiformer.errors import UserError

LEVEL_DENOM = 10.0
TRANSLATE_FRACTION = 0.45
FILL = (124, 116, 104)  # the ImageNet mean in 0..255, as timm fills geometric ops


@dataclass(frozen=True)
class RandAugmentConfig:
    """A parsed timm RandAugment spec such as "rand-m9-mstd0.5-inc1"."""

    magnitude: float = 10.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_DENOM
    prob: float = 0.5
    increasing: bool = False

    @classmethod
    def parse(cls, spec: str) -> RandAugmentConfig:
        """Parse timm's "rand-m<M>-n<N>-mstd<S>-mmax<X>-p<P>-inc<0|1>" grammar."""
        parts = spec.split("-")
        if parts[0] != "rand":
            raise UserError(
                f"RandAugment spec {spec!r} must start with 'rand', e.g. rand-m9-mstd0.5-inc1"
            )
        names = {
            "m": "magnitude",
            "n": "num_ops",
            "mstd": "magnitude_std",
            "mmax": "magnitude_max",
            "p": "prob",
            "inc": "increasing",
        }
        values = {}
        for part in parts[1:]:
            match = re.fullmatch(r"([a-z]+)(\d.*)", part)
            if match is None or match.group(1) not in names:
                raise UserError(
                    f"unknown RandAugment setting {part!r} in {spec!r}: "
                    "use m, n, mstd, mmax, p, inc"
                )
            key, value = match.groups()
            values[names[key]] = (
                bool(int(value)) if key == "inc" else int(value) if key == "n" else float(value)
            )
        return cls(**values)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    """(M,) -> (M, 1, 1, 1) for broadcasting over images."""
    return values.view(-1, 1, 1, 1)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion (ITU-R 601-2, rounded) as (M, 1, H, W) float."""
    r, g, b = images.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1).float()


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, images, factor), truncated to uint8."""
    out = degenerate + _per_image(factor) * (images.float() - degenerate)
    return out.clamp(0, 255).to(torch.uint8)


def _smooth(images: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter: 3x3 kernel [1 1 1; 1 5 1; 1 1 1]/13, border pixels kept."""
    kernel = torch.ones(3, 3, device=images.device)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(3, 1, 3, 3)
    blurred = F.conv2d(images.float(), kernel, groups=3)
    out = images.float().clone()
    out[:, :, 1:-1, 1:-1] = (blurred + 0.5).floor()
    return out


def _affine(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resample like PIL's AFFINE transform: output pixel p reads input pixel matrices @ (p, 1)."""
    m, _, h, w = images.shape
    to_pixels = torch.tensor(
        [[w / 2, 0, w / 2], [0, h / 2, h / 2], [0, 0, 1]], device=images.device
    )
    full = torch.cat(
        [matrices, torch.tensor([[[0.0, 0.0, 1.0]]], device=images.device).expand(m, 1, 3)], 1
    )
    theta = (torch.linalg.inv(to_pixels) @ full @ to_pixels)[:, :2]
    grid = F.affine_grid(theta, [m, 4, h, w], align_corners=False)
    ones = torch.ones(m, 1, h, w, device=images.device)
    sampled = F.grid_sample(
        torch.cat([images.float(), ones], 1), grid, mode="bilinear", align_corners=False
    )
    fill = torch.tensor(FILL, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    out = sampled[:, :3] + (1 - sampled[:, 3:]) * fill
    return out.round().clamp(0, 255).to(torch.uint8)


def _matrices(m: int, device: torch.device, **entries: torch.Tensor) -> torch.Tensor:
    """(M, 2, 3) identity affine matrices with the named entries (a, b, c, d, e, f) replaced."""
    flat = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], device=device).repeat(m, 1)
    for index, name in enumerate("abcdef"):
        if name in entries:
            flat[:, index] = entries[name]
    return flat.view(m, 2, 3)


def auto_contrast(images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to 0..255 (PIL ImageOps.autocontrast)."""
    low = images.amin(dim=(2, 3), keepdim=True).float()
    high = images.amax(dim=(2, 3), keepdim=True).float()
    scale = torch.where(high > low, 255 / (high - low).clamp(min=1), torch.ones_like(high))
    low = torch.where(high > low, low, torch.zeros_like(low))
    return ((images.float() - low) * scale).clamp(0, 255).to(torch.uint8)


def equalize(images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Equalise each channel's histogram (PIL ImageOps.equalize)."""
    return TF.equalize(images)


def invert(images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """255 - x."""
    return 255 - images


def rotate(images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Rotate about the centre by up to 30 degrees (PIL Image.rotate)."""
    _, _, h, w = images.shape
    angle = -torch.deg2rad(level * 30 * sign)
    cos, sin = torch.cos(angle), torch.sin(angle)
    c = w / 2 - cos * w / 2 - sin * h / 2
    f = h / 2 + sin * w / 2 - cos * h / 2
    return _affine(
        images, _matrices(len(images), images.device, a=cos, b=sin, c=c, d=-sin, e=cos, f=f)
    )


def shear_x(images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Horizontal shear by up to 0.3."""
    return _affine(images, _matrices(len(images), images.device, b=level * 0.3 * sign))


def shear_y(images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Vertical shear by up to 0.3."""
    return _affine(images, _matrices(len(images), images.device, d=level * 0.3 * sign))


def translate_x(images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Horizontal shift by up to 45% of the width."""
    shift = level * TRANSLATE_FRACTION * sign * images.shape[3]
    return _affine(images, _matrices(len(images), images.device, c=shift))


def translate_y(images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Vertical shift by up to 45% of the height."""
    shift = level * TRANSLATE_FRACTION * sign * images.shape[2]
    return _affine(images, _matrices(len(images), images.device, f=shift))


def _posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` bits of every pixel (8 or more keeps the image)."""
    shift = (8 - bits.clamp(0, 8)).to(torch.int32)
    masks = ((255 << shift) & 255).to(torch.uint8)
    return images & _per_image(masks)


def posterize(images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Posterize to int(level * 4) bits (timm "Posterize")."""
    return _posterize(images, (level * 4).floor())


def posterize_increasing(
    images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor
) -> torch.Tensor:
    """Posterize to 4 - int(level * 4) bits: stronger with magnitude."""
    return _posterize(images, 4 - (level * 4).floor())


def _solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert the pixels at or above each image's threshold."""
    return torch.where(images.float() >= _per_image(threshold), 255 - images, images)


def solarize(images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Solarize above int(level * 256)."""
    return _solarize(images, (level * 256).floor().clamp(max=256))


def solarize_increasing(
    images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor
) -> torch.Tensor:
    """Solarize above 256 - int(level * 256): stronger with magnitude."""
    return _solarize(images, 256 - (level * 256).floor().clamp(max=256))


def solarize_add(images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Add int(level * 110) to pixels below 128."""
    add = _per_image((level * 110).floor().clamp(max=128))
    return torch.where(images < 128, (images.float() + add).clamp(max=255).to(torch.uint8), images)


def _enhance_factor(level: torch.Tensor, sign: torch.Tensor, increasing: bool) -> torch.Tensor:
    """timm's enhancement factor: 1 +- 0.9 level (increasing, at least 0.1) or 0.1 + 1.8 level."""
    if increasing:
        return (1 + level * 0.9 * sign).clamp(min=0.1)
    return level * 1.8 + 0.1


def _enhance(degenerate: Callable[[torch.Tensor], torch.Tensor], increasing: bool) -> Callable:
    """A PIL ImageEnhance op: blend each image with its `degenerate` version."""

    def op(images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        return _blend(degenerate(images), images, _enhance_factor(level, sign, increasing))

    return op


def _gray(images: torch.Tensor) -> torch.Tensor:
    return _luma(images).expand(-1, 3, -1, -1)


def _mean_gray(images: torch.Tensor) -> torch.Tensor:
    return (
        (_luma(images).mean(dim=(2, 3), keepdim=True) + 0.5)
        .floor()
        .expand(-1, 3, *images.shape[2:])
    )


def _black(images: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(images, dtype=torch.float32)


def rand_augment_ops(increasing: bool) -> dict[str, Callable]:
    """timm's RandAugment op list (`_RAND_INCREASING_TRANSFORMS` or `_RAND_TRANSFORMS`)."""
    return {
        "AutoContrast": auto_contrast,
        "Equalize": equalize,
        "Invert": invert,
        "Rotate": rotate,
        "Posterize": posterize_increasing if increasing else posterize,
        "Solarize": solarize_increasing if increasing else solarize,
        "SolarizeAdd": solarize_add,
        "Color": _enhance(_gray, increasing),
        "Contrast": _enhance(_mean_gray, increasing),
        "Brightness": _enhance(_black, increasing),
        "Sharpness": _enhance(_smooth, increasing),
        "ShearX": shear_x,
        "ShearY": shear_y,
        "TranslateXRel": translate_x,
        "TranslateYRel": translate_y,
    }


class DeviceRandAugment:
    """timm-style RandAugment for a uint8 (N, 3, H, W) batch: per image, `num_ops` random ops."""

    def __init__(self, config: RandAugmentConfig):
        self.config = config
        self.ops = list(rand_augment_ops(config.increasing).values())

    @classmethod
    def from_spec(cls, spec: str) -> DeviceRandAugment:
        """Build from a timm spec string such as "rand-m9-mstd0.5-inc1"."""
        return cls(RandAugmentConfig.parse(spec))

    def _magnitudes(
        self, n: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """Per-image magnitudes: Gaussian around the magnitude (uniform if std is inf), clipped."""
        config = self.config
        if math.isinf(config.magnitude_std):
            magnitude = torch.rand(n, generator=generator, device=device) * config.magnitude
        else:
            noise = torch.randn(n, generator=generator, device=device) * config.magnitude_std
            magnitude = config.magnitude + noise
        return magnitude.clamp(0, config.magnitude_max)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        n, device = len(images), images.device
        images = images.clone()
        for _ in range(self.config.num_ops):
            op_index = torch.randint(len(self.ops), (n,), generator=generator, device=device)
            applied = torch.rand(n, generator=generator, device=device) < self.config.prob
            level = self._magnitudes(n, generator, device) / LEVEL_DENOM
            sign = torch.where(
                torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0
            ).to(device)
            for index, op in enumerate(self.ops):
                chosen = (applied & (op_index == index)).nonzero().squeeze(1)
                if len(chosen):
                    images[chosen] = op(images[chosen], level[chosen], sign[chosen])
        return images


def random_horizontal_flip(
    images: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mirror each image of an (N, C, H, W) batch with probability `probability` (a new tensor)."""
    chosen = torch.rand(len(images), generator=generator, device=images.device) < probability
    return torch.where(_per_image(chosen), images.flip(-1), images)


@dataclass(frozen=True)
class DeviceRandomErasing:
    """timm's `RandomErasing(probability, mode="pixel")` for a normalised float batch, drawing from a
    given generator: each image, with probability `probability`, gets one rectangle of Gaussian
    noise covering `scale` of its area with an aspect ratio log-uniform in `ratio` (the first of
    `attempts` draws that fits; none if none fits)."""

    probability: float
    scale: tuple[float, float] = (0.02, 1 / 3)
    ratio: tuple[float, float] = (0.3, 1 / 0.3)
    attempts: int = 10

    def _boxes(
        self, n: int, height: int, width: int, generator: torch.Generator | None, device
    ) -> tuple[torch.Tensor, ...]:
        """Per image: (erase?, top, left, box height, box width) as (N,) tensors."""
        draws = torch.rand(n, self.attempts, 2, generator=generator, device=device)
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * draws[..., 0])
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_low + (log_high - log_low) * draws[..., 1])
        box_h = torch.sqrt(area * aspect).round().long()
        box_w = torch.sqrt(area / aspect).round().long()
        fits = (box_h < height) & (box_w < width)
        first = fits.int().argmax(1, keepdim=True)
        box_h, box_w = box_h.gather(1, first).squeeze(1), box_w.gather(1, first).squeeze(1)
        chosen = torch.rand(n, generator=generator, device=device) < self.probability
        corner = torch.rand(n, 2, generator=generator, device=device)
        top = (corner[:, 0] * (height - box_h + 1)).long()
        left = (corner[:, 1] * (width - box_w + 1)).long()
        return chosen & fits.any(1), top, left, box_h, box_w

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        n, channels, height, width = images.shape
        erase, top, left, box_h, box_w = self._boxes(n, height, width, generator, images.device)
        rows = torch.arange(height, device=images.device).view(1, height, 1)
        cols = torch.arange(width, device=images.device).view(1, 1, width)
        inside = (
            (rows >= _column(top)) & (rows < _column(top + box_h))
            & (cols >= _column(left)) & (cols < _column(left + box_w))
        )  # fmt: skip
        mask = (inside & _column(erase)).unsqueeze(1)
        noise = torch.randn(
            images.shape, generator=generator, device=images.device, dtype=images.dtype
        )
        return torch.where(mask, noise, images)


def _column(values: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1) for broadcasting over rows and columns."""
    return values.view(-1, 1, 1)
