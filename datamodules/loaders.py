"""The DataLoader settings every data module shares, and training order as a pure function of (seed, epoch).

Why our own sampler: torch's ``RandomSampler`` and transformers' ``LengthGroupedSampler`` draw each epoch's order
from a generator that advances from epoch to epoch, and a DataLoader draws its workers' seeds from the global RNG when
its iterator is created. Neither state is in a checkpoint, so a resumed run shuffled, augmented and dropped out
differently from the run it continues (issue 15: 12 of 74 tensors equal after a resume). Here every random stream of
a training epoch starts from ``(seed, epoch)``: the order (:class:`EpochSampler`), the workers' seeds (the loader's
generator, reseeded with the epoch) and, through ``callbacks.reliability.EpochSeed``, the global Python, NumPy and
torch RNGs of the main process. Training workers are not persistent, since they would carry their RNG state across
epochs.

Under DDP the order is split the same way: :class:`EpochSampler` is a ``DistributedSampler`` (so Lightning does not
wrap it in its own, which would shuffle the order again with another seed), and rank ``r`` of ``W`` takes every
``W``-th index of the one global order, from position ``r``. Batch ``k`` of the ``W`` ranks together is then batch
``k`` of one process whose batch is ``W`` times larger: a run on 2 nodes and one on 1 device with the same global
batch see the same samples at every step (tests/test_scaling.py), and changing the device count does not change the
data a step sees.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def derive_seed(*parts: int) -> int:
    """A 32-bit seed that depends on every part (``seed, epoch, stream``), well mixed."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def run_seed() -> int:
    """The run's seed: ``seed_everything``'s (``PL_GLOBAL_SEED``), 0 when none was set."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def batches_done(trainer) -> int:
    """Training batches of the current epoch already run when ``fit`` resumed from a checkpoint saved in the middle
    of an epoch (a requeued job); 0 otherwise. Lightning counts them as done, so the loader must not serve them
    again: :func:`make_loader` skips them in the epoch's order."""
    loop = getattr(trainer, "fit_loop", None)
    if loop is None or not loop.restarting:
        return 0
    progress = loop.epoch_loop.batch_progress
    return 0 if progress.is_last_batch else progress.current.ready  # what Lightning adds to its own count


def current_epoch(trainer) -> int:
    """The epoch a training loader built now will serve: Lightning's count of processed epochs (already the next
    epoch right after a resume from an end-of-epoch checkpoint); 0 without a trainer."""
    loop = getattr(trainer, "fit_loop", None)
    return int(loop.epoch_progress.current.processed) if loop is not None else 0


def seed_globals(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EpochSampler(DistributedSampler):
    """A shuffled order that depends only on ``(seed, epoch)``; ``set_epoch`` moves to another epoch. Under DDP each
    rank takes its strided share of that one order (padded to a multiple of the world size by repeating its first
    indices, as torch's ``DistributedSampler`` does), so every rank has the same number of batches.

    ``generator`` is reseeded with the epoch too: given to the DataLoader, it is where the loader draws its workers'
    base seed, so the workers' random streams are also a function of ``(seed, epoch)``.

    Args:
        length: number of samples.
        seed: the run's seed.
        epoch: the epoch of the first pass (a loader built after a resume starts at the resumed epoch).
        order: ``(generator) -> list of indices`` for another order than a permutation (length grouping).
    """

    def __init__(self, length: int, seed: int, epoch: int = 0, order: Callable | None = None):
        # DistributedSampler's __init__ is not called: it needs the process group, which does not exist yet when a
        # data module builds its loaders; the rank and world size are read when the order is drawn.
        self.length, self.seed, self.order = length, seed, order
        self.generator = torch.Generator()
        self.skip = 0  # samples of this rank's share already trained on (a run resumed mid-epoch), once
        self.epoch = epoch
        self.set_epoch(epoch)

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    # What code that meets a DistributedSampler may read of it (its __init__ would have set these).
    shuffle, drop_last = True, False

    @property
    def rank(self) -> int:
        return self._rank_world()[0]

    @property
    def num_replicas(self) -> int:
        return self._rank_world()[1]

    @property
    def num_samples(self) -> int:
        return len(self)

    @property
    def total_size(self) -> int:
        return len(self) * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch
        self.generator.manual_seed(derive_seed(self.seed, epoch, 1))

    def __len__(self) -> int:
        world = self._rank_world()[1]
        return -(-self.length // world)  # this rank's share, padded

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0))
        order = self.order(generator) if self.order else torch.randperm(self.length, generator=generator).tolist()
        rank, world = self._rank_world()
        if world > 1:
            padded = -(-len(order) // world) * world
            order = (order * (padded // max(len(order), 1) + 1))[:padded]
            order = order[rank::world]
        order, self.skip = order[self.skip :], 0  # a resumed epoch goes on where it stopped, with the same order
        return iter(order)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker's torch and Python RNGs from the loader's base seed + worker id; NumPy too, here.
    np.random.seed(torch.initial_seed() % 2**32)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool = False,
    epoch: int = 0,
    sampler: EpochSampler | None = None,
    skip_batches: int = 0,
    **kwargs,
) -> DataLoader:
    """A DataLoader with pinned memory when a GPU is present; training (``shuffle`` or an :class:`EpochSampler`)
    draws its order and its workers' seeds from ``(seed, epoch)``.

    Args:
        dataset: the map-style dataset.
        batch_size: samples per batch.
        num_workers: worker processes (0 loads in the main process: best for data already in memory).
        shuffle: a new order every epoch, a function of the run's seed and the epoch (training).
        epoch: the epoch this loader starts at (``current_epoch(trainer)``), for ``shuffle`` or ``sampler``.
        sampler: an :class:`EpochSampler` with another order (its epoch is set to ``epoch``).
        skip_batches: batches of this epoch already trained (:func:`batches_done`): the order starts after them.
        kwargs: further DataLoader arguments (``collate_fn``, ...).
    """
    if shuffle and sampler is None:
        sampler = EpochSampler(len(dataset), run_seed(), epoch)
    if sampler is not None:
        sampler.set_epoch(epoch)
        sampler.skip = skip_batches * batch_size
        generator = sampler.generator
    else:
        # Evaluation loaders draw their workers' seed from a private generator, never from the global RNG, whose
        # state would then depend on how many evaluation passes ran (a resumed run has one more sanity check).
        generator = torch.Generator().manual_seed(0)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0 and sampler is None,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
        **kwargs,
    )
