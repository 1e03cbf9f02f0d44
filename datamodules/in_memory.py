"""Small grey-scale image sets held in memory as uint8 tensors (scikit-learn digits, MNIST, Fashion-MNIST): the
splits, the resizing to ``image_size`` with 3 channels, the augmentation and the loaders they share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from datamodules.folds import check_fold, fold_split
from datamodules.loaders import batches_done, current_epoch, make_loader
from datamodules.transforms import Augment, train_transform


class TensorImageDataset(Dataset):
    """Images held in memory as a uint8 tensor ``(N, C, H, W)``, with a transform applied per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        return (self.transform(image) if self.transform else image), self.labels[i]


def to_rgb_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Grey images ``(N, 1, h, w)`` in [0, 1] -> uint8 ``(N, 3, size, size)`` (bilinear; the 3 channels are a view)."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)


class InMemoryImageDataModule(LightningDataModule):
    """Base class: subclasses set ``class_names`` and define :meth:`load`.

    The splits are stratified and fixed by ``seed``: the same seed always gives the same train/val/test images.

    Args:
        image_size: side length the images are resized to (bilinear).
        batch_size: batch size of every loader.
        val_fraction: share of the images held out for validation.
        test_fraction: share held out for the test set (when the data set has no test set of its own).
        seed: seed of the split.
        augment: augmentation preset for training (``none``, ``basic``, ``randaugment``); digits are never flipped.
        rotation: maximum rotation in degrees for the ``basic`` preset.
        crop_scale: area range of the random resized crop.
        num_workers: data-loader workers (the data is in memory: 0 avoids starting processes).
        num_folds: cross-validation (``make cv``): cut the images that are not the test set into this many folds,
            stratified and seeded, instead of a ``val_fraction`` split.
        fold: the fold that is the validation split (0 to ``num_folds - 1``).
    """

    def __init__(
        self,
        image_size: int = 64,
        batch_size: int = 64,
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
        super().__init__()
        check_fold(fold, num_folds)
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in (0, 1) "
                "and leave images for training"
            )
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``(images, labels, test)``: grey images ``(N, 1, h, w)`` in [0, 1], integer labels, and the data set's own
        test split as ``(images, labels)`` or None to split one off."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        hp = self.hparams
        images, labels, test_split = self.load()
        index = torch.arange(len(labels)).numpy()
        if test_split is None:
            rest, test = train_test_split(index, test_size=hp.test_fraction, stratify=labels, random_state=hp.seed)
            val_share = hp.val_fraction / (1 - hp.test_fraction)
        else:
            rest, test, val_share = index, None, hp.val_fraction
        if hp.get("num_folds"):
            inner_train, inner_val = fold_split(len(rest), hp.num_folds, hp.fold, hp.seed, labels[rest].tolist())
            train, val = rest[inner_train], rest[inner_val]
            self.val_keys = [(str(i), self.class_names[int(labels[i])]) for i in val]  # out-of-fold predictions
            self.fold = hp.fold
        else:
            train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=hp.seed)

        augment = train_transform(
            hp.image_size, hp.augment, hflip=False, rotation=hp.rotation, crop_scale=hp.crop_scale
        )
        to_float = v2.ToDtype(torch.float32, scale=True)
        images = to_rgb_uint8(images, hp.image_size)
        self.train_set = TensorImageDataset(images[train], labels[train], augment)
        self.val_set = TensorImageDataset(images[val], labels[val], to_float)
        if test_split is None:
            self.test_set = TensorImageDataset(images[test], labels[test], to_float)
        else:
            self.test_set = TensorImageDataset(to_rgb_uint8(test_split[0], hp.image_size), test_split[1], to_float)

    def image_transform(self) -> v2.Compose:
        """The evaluation pipeline for an image file (``scripts/predict.py``): grey images resized whole, as the data
        set's images are here (no crop), as 3 channels in [0, 1]."""
        size = self.hparams.image_size
        return v2.Compose(
            [
                v2.ToImage(),
                v2.Grayscale(num_output_channels=3),
                v2.Resize((size, size), antialias=True),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        epoch = current_epoch(self.trainer)
        skip = batches_done(self.trainer)
        return make_loader(
            dataset, self.hparams.batch_size, self.hparams.num_workers, shuffle, epoch, skip_batches=skip
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)
