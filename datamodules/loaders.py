"""The DataLoader settings every data module shares."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool = False, **kwargs) -> DataLoader:
    """A DataLoader with workers kept alive between epochs and pinned memory when a GPU is present.

    Args:
        dataset: the map-style dataset.
        batch_size: samples per batch.
        num_workers: worker processes (0 loads in the main process: best for data already in memory).
        shuffle: reshuffle every epoch (training).
        kwargs: further DataLoader arguments (``collate_fn``, ``sampler``, ...).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        **kwargs,
    )
