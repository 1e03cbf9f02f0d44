"""scikit-learn's 1,797 real 8x8 handwritten digits as a small image-classification task that needs no download."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from datamodules.in_memory import InMemoryImageDataModule


class DigitsDataModule(InMemoryImageDataModule):
    """The scikit-learn digits (10 classes), upsampled to ``image_size`` and repeated to 3 channels; train, val and
    test are split from the 1,797 images by ``val_fraction`` and ``test_fraction`` (arguments: see
    :class:`~datamodules.in_memory.InMemoryImageDataModule`)."""

    class_names = [str(i) for i in range(10)]

    def load(self):
        digits = load_digits()
        images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
        return images, torch.from_numpy(digits.target).long(), None
