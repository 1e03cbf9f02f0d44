"""Augmentation presets (torchvision transforms v2) for images fed to ``ImageClassifier``.

Every pipeline ends with float images in [0, 1]; normalization is the model's job (it knows its backbone's mean/std).

Presets:
    none: resize (train) to ``image_size``, nothing random.
    basic: what practitioners reach for first: random resized crop, horizontal flip, a small rotation and
        brightness/contrast jitter.
    randaugment: ``basic`` followed by RandAugment.
"""

from __future__ import annotations

from typing import Literal

import torch
from torchvision.transforms import v2

Augment = Literal["none", "basic", "randaugment"]


def train_transform(
    image_size: int,
    augment: Augment = "basic",
    hflip: bool = True,
    rotation: float = 10.0,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    jitter: float = 0.2,
) -> v2.Compose:
    """Training pipeline for PIL images or uint8 tensors.

    Args:
        image_size: output side length in pixels.
        augment: preset name: ``none``, ``basic`` or ``randaugment``.
        hflip: flip horizontally at random (turn off for digits, text, anything with a handedness).
        rotation: maximum rotation in degrees.
        crop_scale: range of the crop's area, as a fraction of the image, in the random resized crop.
        jitter: brightness and contrast jitter strength.
    """
    if augment not in ("none", "basic", "randaugment"):
        raise ValueError(f"unknown augment preset {augment!r}; choose none, basic or randaugment")
    steps: list = [v2.ToImage()]
    if augment == "none":
        steps.append(v2.Resize((image_size, image_size), antialias=True))
    else:
        steps.append(v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        if rotation:
            steps.append(v2.RandomRotation(rotation))
        if jitter:
            steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter))
        if augment == "randaugment":
            steps.append(v2.RandAugment())
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def eval_transform(image_size: int, crop_fraction: float = 0.875) -> v2.Compose:
    """Evaluation pipeline: resize the short side to ``image_size / crop_fraction``, then center-crop ``image_size``.

    Args:
        image_size: output side length in pixels.
        crop_fraction: the center crop's share of the resized image (0.875 is the ImageNet convention, 224 of 256).
    """
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(round(image_size / crop_fraction), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
