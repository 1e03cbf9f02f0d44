"""Shared fixtures: everything offline, on CPU, with tiny backbones and data the tests write themselves."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", ".*does not have many workers.*")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_images(folder: Path, count: int, color: tuple[int, int, int], size: int = 24, seed: int = 0) -> None:
    """Write ``count`` small noisy JPEGs of one dominant colour into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        noise = rng.integers(-30, 30, size=(size, size, 3))
        pixels = np.clip(np.array(color)[None, None, :] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.jpg")


class Blobs(LightningDataModule):
    """Three classes of random 32 px images, fixed order (no shuffling) so that runs are exactly repeatable."""

    num_classes, class_names = 3, ["a", "b", "c"]

    def __init__(self, n: int = 24, batch_size: int = 4):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        labels = torch.arange(n) % 3
        images = torch.rand(n, 3, 32, 32, generator=generator) * 0.5 + labels.view(-1, 1, 1, 1) * 0.25
        self.data, self.batch_size = TensorDataset(images, labels), batch_size

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A two-class folder (``red``, ``blue``) of 12 images each, not split."""
    root = tmp_path / "colors"
    write_images(root / "red", 12, (220, 30, 30), seed=1)
    write_images(root / "blue", 12, (30, 30, 220), seed=2)
    return root


@pytest.fixture
def split_image_folder(tmp_path: Path) -> Path:
    """A three-class folder already split into ``train/``, ``val/`` and ``test/``."""
    root = tmp_path / "split"
    colors = {"blue": (30, 30, 220), "green": (30, 220, 30), "red": (220, 30, 30)}
    for split, count in (("train", 8), ("val", 3), ("test", 2)):
        for k, (name, color) in enumerate(colors.items()):
            write_images(root / split / name, count, color, seed=10 * k + count)
    return root


@pytest.fixture(autouse=True)
def _fresh_master_port(monkeypatch):
    """Lightning leaves the MASTER_PORT of a DDP test in this process's environment, and that port may still be
    bound when the next DDP test starts: every test starts without one, so Lightning picks a free port."""
    monkeypatch.delenv("MASTER_PORT", raising=False)


@pytest.fixture(autouse=True)
def _close_wandb_runs():
    """A W&B run left open by a test (a CLI built with run=False, a Trainer fitted by hand) would be reused by the
    next W&B logger in this process, as Lightning's WandbLogger adopts an active run: close it after each test."""
    yield
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
