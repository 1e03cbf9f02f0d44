"""Image folders in the ImageNet layout: ``<root>/<class>/<image>``, already split or split here.

Two layouts are accepted:

* ``data_dir/train/<class>/...``, ``data_dir/val/<class>/...`` and optionally ``data_dir/test/<class>/...``
  (no ``test/``: the test stage uses ``val/`` and says so; no ``val/``: it is split off ``train/``). ``val_dir``
  and ``test_dir`` rename those folders: a data set that ships only ``train/`` and ``val/`` (ants vs bees) is tested
  honestly with ``val_dir: null, test_dir: val``: validation is then split off ``train/`` (stratified, seeded) and
  ``val/`` is only ever tested on;
* ``data_dir/<class>/...``: one folder, split per class into train/val/test by fractions and a seed.

Class names are the folder names of the training images, sorted; label ``i`` is ``class_names[i]``.
Files that are not images (by extension, or, with ``verify_images``, by their header) are skipped with one warning
that names them; an empty class folder, a folder with no images or an empty split is an error that names the folder.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from lightning import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from datamodules.folds import check_fold, fold_split
from datamodules.loaders import batches_done, current_epoch, make_loader
from datamodules.transforms import Augment, eval_transform, train_transform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

Sample = tuple[Path, int]


def load_rgb(path: str | Path) -> Image.Image:
    """An image file as 8-bit RGB. 16-bit grey images (PIL modes ``I;16*`` and ``I``) are scaled from 0-65535 to
    0-255 (PIL's ``convert("RGB")`` clips them: 99.6% of a 16-bit ramp became 255), float images from [0, 1]."""
    with Image.open(path) as image:
        image.load()
        if image.mode.startswith("I") or image.mode == "F":
            values = np.asarray(image, dtype=np.float64)
            scale = 255.0 if image.mode == "F" else 255.0 / 65535.0
            grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
            return Image.fromarray(grey, mode="L").convert("RGB")
        return image.convert("RGB")


class ImageFileDataset(Dataset):
    """``(path, label)`` pairs read as RGB (:func:`load_rgb`). A file that fails to decode (a truncated JPEG passes
    the header check at set-up) is skipped with a warning that names it: the item is None and
    :func:`collate_skipping` leaves it out of its batch."""

    def __init__(self, samples: Sequence[Sample], transform=None):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            image = load_rgb(path)
        except Exception as err:  # PIL raises several unrelated types for bad files
            warnings.warn(f"skipped image {path}: it cannot be decoded ({err})", stacklevel=2)
            return None
        return (self.transform(image) if self.transform else image), label


def collate_skipping(batch: list):
    """``default_collate`` of the readable items of a batch (unreadable images are None)."""
    kept = [item for item in batch if item is not None]
    if not kept:
        raise RuntimeError(f"none of the {len(batch)} images of a batch could be decoded (see the warnings above)")
    return default_collate(kept)


def _readable(path: Path) -> str | None:
    """None if PIL recognises the file's header as an image, else the reason it does not."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:
        return f"unreadable image: {type(err).__name__}"
    return None


def list_class_folders(data_dir: str | Path) -> list[str] | None:
    """The class folders of a data set, sorted, without reading a file: those of ``data_dir/train`` when it exists,
    else of ``data_dir``; None when the folder does not exist (``setup`` then says so)."""
    root = Path(data_dir).expanduser()
    base = root / "train" if (root / "train").is_dir() else root
    if not base.is_dir():
        return None
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_class_folders(
    root: Path, class_names: list[str] | None = None, verify: bool = True
) -> tuple[list[Sample], list[str]]:
    """List the images of ``root/<class>/**`` with their labels.

    Args:
        root: folder holding one sub-folder per class.
        class_names: the label order to use (from the training folder); None derives it from ``root``, sorted,
            and then every class folder must hold images. With it given, a folder not in it is an error.
        verify: read each file's header and skip files that are not images.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"no class folders in {root}: expected {root}/<class name>/<image files>")
    derive = class_names is None
    names = [p.name for p in folders] if derive else class_names
    index = {name: i for i, name in enumerate(names)}

    samples: list[Sample] = []
    skipped: list[str] = []
    empty: list[Path] = []
    for folder in folders:
        if folder.name not in index:
            raise ValueError(f"class folder {folder} is not one of the training classes {names}")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        skipped += [f"{p} (not an image extension)" for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if verify and images:
            with ThreadPoolExecutor(max_workers=8) as pool:
                reasons = list(pool.map(_readable, images))
            skipped += [f"{p} ({why})" for p, why in zip(images, reasons, strict=True) if why]
            images = [p for p, why in zip(images, reasons, strict=True) if not why]
        if not images:
            empty.append(folder)
        samples += [(p, index[folder.name]) for p in images]
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(f"skipped {len(skipped)} file(s) in {root} that are not readable images: {shown}", stacklevel=2)
    if not samples:
        raise ValueError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if derive and empty:
        raise ValueError(f"class folder {empty[0]} has no images: remove it or add images")
    return samples, names


def split_per_class(samples: Sequence[Sample], fractions: Sequence[float], seed: int) -> list[list[Sample]]:
    """Split ``samples`` into ``len(fractions) + 1`` parts per class (the first part takes the remainder)."""
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    rng = random.Random(seed)
    parts: list[list[Sample]] = [[] for _ in range(len(fractions) + 1)]
    for label in sorted(by_class):
        items = by_class[label]
        rng.shuffle(items)
        start = len(items)
        for k, fraction in enumerate(fractions, 1):
            count = round(len(items) * fraction)
            parts[k] += items[start - count : start]
            start -= count
        parts[0] += items[:start]
    return parts


def _need_two_classes(root: Path, names: list[str]) -> None:
    if len(names) < 2:
        raise ValueError(
            f"{root} has one class folder ({names[0]!r}): a classifier needs at least two, as {root}/<class>/<images>"
        )


class ImageFolderDataModule(LightningDataModule):
    """Images in class folders (see the module docstring for the two layouts).

    Args:
        data_dir: root folder of the data set.
        image_size: side length of the images fed to the model.
        batch_size: batch size of every loader.
        val_dir: folder (under ``data_dir``) of the validation images; None, or a folder that does not exist,
            splits validation off ``train/`` by ``val_fraction``.
        test_dir: folder of the test images; None, or a folder that does not exist, tests on the validation images
            (with a warning, and ``fit`` then tests its last weights rather than the checkpoint chosen on them).
        val_fraction: share of each class held out for validation when the data is not already split.
        test_fraction: share of each class held out for testing when the data is not already split.
        seed: seed of the split.
        augment: training augmentation preset (``none``, ``basic``, ``randaugment``).
        hflip: random horizontal flips in training.
        rotation: maximum rotation in degrees in training.
        crop_scale: area range of the training random resized crop.
        num_workers: data-loader worker processes (image decoding runs there).
        verify_images: read each file's header once at set-up and skip (with a warning) files that are not images.
        predict_dir: folder of images (searched recursively) for ``predict``; None predicts on the test split.
        num_folds: cross-validation (``make cv``): cut the training and validation images (never the test images)
            into this many folds, stratified by class and seeded, instead of the splits above.
        fold: the fold that is the validation split (0 to ``num_folds - 1``).
    """

    def __init__(
        self,
        data_dir: str,
        image_size: int = 224,
        batch_size: int = 32,
        val_dir: str | None = "val",
        test_dir: str | None = "test",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        augment: Augment = "basic",
        hflip: bool = True,
        rotation: float = 10.0,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        num_workers: int = 2,
        verify_images: bool = True,
        predict_dir: str | None = None,
        num_folds: int | None = None,
        fold: int | None = None,
    ):
        super().__init__()
        check_fold(fold, num_folds)
        self.save_hyperparameters()
        self._class_names: list[str] | None = None
        self.test_is_val = False  # True when the test split is the validation data (scripts/train.py reads it)

    @property
    def class_names(self) -> list[str] | None:
        """The class folders' names, sorted: known before ``setup`` (the model is built with them), from a listing
        of the training folder; ``setup`` checks that each holds images."""
        if self._class_names is None:
            self._class_names = list_class_folders(self.hparams.data_dir)
        return self._class_names or None

    @class_names.setter
    def class_names(self, names: list[str] | None) -> None:
        self._class_names = names

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names else None

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "splits"):
            return
        hp = self.hparams
        root = Path(hp.data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.data_dir {root} does not exist")
        splits = self._read_splits(root)
        if hp.num_folds:  # cross-validation: the folds cut train + val; the test split stays out of them
            pool = splits["train"] + splits["val"]
            labels = [label for _, label in pool]
            train, val = fold_split(len(pool), hp.num_folds, hp.fold, hp.seed, labels, where=str(root))
            splits["train"], splits["val"] = [pool[i] for i in train], [pool[i] for i in val]
            if self.test_is_val:
                splits["test"] = splits["val"]
            self.val_keys = [(str(path), self.class_names[label]) for path, label in splits["val"]]
            self.fold = hp.fold
        for name, samples in splits.items():
            if not samples:
                raise ValueError(
                    f"the {name} split of {root} is empty: adjust data.{name}_fraction or add images to {root}"
                )
        self.splits = splits

    def _read_splits(self, root: Path) -> dict[str, list[Sample]]:
        hp = self.hparams
        if not (root / "train").is_dir():
            samples, self.class_names = scan_class_folders(root, verify=hp.verify_images)
            _need_two_classes(root, self.class_names)
            train, val, test = split_per_class(samples, [hp.val_fraction, hp.test_fraction], hp.seed)
            return {"train": train, "val": val, "test": test}
        train, self.class_names = scan_class_folders(root / "train", verify=hp.verify_images)
        _need_two_classes(root / "train", self.class_names)
        if hp.val_dir is not None and hp.val_dir == hp.test_dir:
            raise ValueError(f"data.val_dir and data.test_dir are both {hp.val_dir!r}: validate and test on other data")
        if hp.val_dir and (root / hp.val_dir).is_dir():
            val, _ = scan_class_folders(root / hp.val_dir, self.class_names, verify=hp.verify_images)
        else:
            train, val = split_per_class(train, [hp.val_fraction], hp.seed)
        if hp.test_dir and (root / hp.test_dir).is_dir():
            test, _ = scan_class_folders(root / hp.test_dir, self.class_names, verify=hp.verify_images)
        else:
            warnings.warn(
                f"{root} has no {hp.test_dir or 'test'}/ folder: the test stage evaluates on the validation images",
                stacklevel=2,
            )
            test = val
            self.test_is_val = True
        return {"train": train, "val": val, "test": test}

    def image_transform(self):
        """The evaluation pipeline for an image file (``scripts/predict.py``)."""
        return eval_transform(self.hparams.image_size)

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        epoch = current_epoch(self.trainer)
        return make_loader(
            dataset,
            self.hparams.batch_size,
            self.hparams.num_workers,
            shuffle,
            epoch,
            skip_batches=batches_done(self.trainer),
            collate_fn=collate_skipping,
        )

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        augment = train_transform(hp.image_size, hp.augment, hp.hflip, hp.rotation, tuple(hp.crop_scale))
        return self._loader(ImageFileDataset(self.splits["train"], augment), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(ImageFileDataset(self.splits["val"], eval_transform(self.hparams.image_size)))

    def test_dataloader(self) -> DataLoader:
        return self._loader(ImageFileDataset(self.splits["test"], eval_transform(self.hparams.image_size)))

    def predict_dataloader(self) -> DataLoader:
        transform = eval_transform(self.hparams.image_size)
        if self.hparams.predict_dir is None:
            return self._loader(ImageFileDataset(self.splits["test"], transform))
        folder = Path(self.hparams.predict_dir)
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"data.predict_dir {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.predict_files = files
        return self._loader(ImageFileDataset([(p, -1) for p in files], transform))

    def state_dict(self) -> dict:
        return {"class_names": self.class_names}

    def load_state_dict(self, state_dict: dict) -> None:
        self.class_names = state_dict.get("class_names") or self.class_names
