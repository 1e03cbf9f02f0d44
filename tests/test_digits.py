"""DigitsDataModule: real scikit-learn digits, upsampled, 3 channels, fixed seeded stratified splits."""

from __future__ import annotations

import pytest
import torch

from datamodules.digits import DigitsDataModule


def test_splits_are_fixed_by_the_seed_and_disjoint() -> None:
    dm = DigitsDataModule(image_size=16, batch_size=32)
    dm.setup("fit")
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797 and sizes[2] == 360 and sizes[1] == 180
    again = DigitsDataModule(image_size=16)
    again.setup("fit")
    assert torch.equal(again.test_set.images, dm.test_set.images)
    other = DigitsDataModule(image_size=16, seed=1)
    other.setup("fit")
    assert not torch.equal(other.test_set.images, dm.test_set.images)
    assert torch.bincount(dm.test_set.labels).min() >= 35  # stratified: every digit about 36 times


def test_batches_are_upsampled_three_channel_images_in_unit_range() -> None:
    dm = DigitsDataModule(image_size=24, batch_size=8)
    dm.setup("fit")
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (8, 3, 24, 24) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.9
    assert torch.equal(images[:, 0], images[:, 1]) and labels.dtype == torch.long
    train_images, _ = next(iter(dm.train_dataloader()))
    assert train_images.shape == (8, 3, 24, 24)
    assert dm.num_classes == 10 and dm.class_names[3] == "3"


def test_fractions_must_leave_training_images() -> None:
    with pytest.raises(ValueError, match="val_fraction=0.5 and data.test_fraction=0.5"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5)
