"""Augmentation presets: every pipeline yields float images in [0, 1] of the requested size."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from datamodules.transforms import eval_transform, train_transform


@pytest.mark.parametrize("preset", ["none", "basic", "randaugment"])
def test_presets_give_unit_range_float_images(preset: str) -> None:
    image = Image.new("RGB", (50, 40), (200, 100, 50))
    out = train_transform(32, preset)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    uint8 = train_transform(32, preset)(torch.full((3, 40, 50), 120, dtype=torch.uint8))
    assert uint8.shape == (3, 32, 32) and uint8.dtype == torch.float32


def test_preset_contents() -> None:
    kinds = lambda t: [type(step).__name__ for step in t.transforms]  # noqa: E731
    assert "RandAugment" in kinds(train_transform(32, "randaugment"))
    basic = kinds(train_transform(32, "basic"))
    assert {"RandomResizedCrop", "RandomHorizontalFlip", "RandomRotation", "ColorJitter"} <= set(basic)
    assert "RandomHorizontalFlip" not in kinds(train_transform(32, "basic", hflip=False))
    assert not any(isinstance(step, v2.RandomResizedCrop) for step in train_transform(32, "none").transforms)


def test_eval_transform_resizes_then_center_crops() -> None:
    image = Image.new("RGB", (100, 60))
    assert eval_transform(28)(image).shape == (3, 28, 28)


def test_unknown_preset_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown augment preset 'heavy'"):
        train_transform(32, "heavy")
