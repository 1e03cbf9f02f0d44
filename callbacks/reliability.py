"""What keeps a run's results exact and its files safe; ``scripts/train.py`` adds each of these to every run.

* :class:`EpochSeed`: every training epoch starts the global Python, NumPy and torch RNGs from ``(seed, epoch)``
  (with ``datamodules.loaders``, which does the same for the order and the loader workers), so a run resumed from
  an end-of-epoch checkpoint is bit-identical to the run it continues, with no random state stored.
* :class:`Checkpoint`: Lightning's ``ModelCheckpoint`` that writes ``last.ckpt`` after every epoch (Lightning 2.6
  writes it only when a top-k checkpoint was saved at that step, so ``last.ckpt`` could be an older epoch and a
  resume repeated epochs) and never under ``fast_dev_run``.
* :class:`AtomicCheckpointIO`: a checkpoint is written to a temporary file in its own folder, flushed to disk, then
  renamed over the old one, so a killed or failed save never leaves a truncated file or loses the previous one
  (Lightning's writer stages the file in the system temporary folder, and the final move is a copy when that folder
  is on another filesystem).
* :class:`FiniteGuard`: a non-finite loss, gradient or monitored validation metric stops the run with one line that
  names the step and the parameter group, before the optimizer step and before any checkpoint of it is saved.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.loaders import EpochSampler, derive_seed, run_seed, seed_globals


class RunError(RuntimeError):
    """A run cannot go on; the message says why and what to do (the CLI prints it as one line)."""


class EpochSeed(Callback):
    """Seeds the global RNGs from ``(seed, epoch)`` at the start of every training epoch, and moves every
    :class:`~datamodules.loaders.EpochSampler` of the training loader to the epoch (also one wrapped for DDP)."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.fit_loop.restarted_mid_epoch and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            rank_zero_warn(
                "resumed from a checkpoint saved in the middle of an epoch: the epoch goes on with the batches it had "
                "not trained yet, in the same order, but its random draws (augmentation, dropout) differ from an "
                "uninterrupted run's, so the run is not bit-identical to one (end-of-epoch checkpoints are)"
            )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        seed_globals(derive_seed(run_seed(), epoch, 2))
        for sampler in _epoch_samplers(trainer.train_dataloader):
            sampler.set_epoch(epoch)


def _epoch_samplers(loaders) -> list[EpochSampler]:
    found = []
    for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
        for sampler in (
            getattr(loader, "sampler", None),
            getattr(getattr(loader, "batch_sampler", None), "sampler", None),
        ):
            inner = getattr(
                getattr(sampler, "dataset", None), "_sampler", None
            )  # Lightning's DistributedSamplerWrapper
            found += [s for s in (sampler, inner) if isinstance(s, EpochSampler)]
    return found


class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments) whose ``last.ckpt`` is always the last epoch, and that writes
    nothing under ``fast_dev_run``."""

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_every_epoch(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_every_epoch(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.fast_dev_run:  # Lightning's would write last.ckpt into ./checkpoints of a debug run
            super().on_train_end(trainer, pl_module)

    def _save_last_every_epoch(self, trainer: Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to ``.<name>.<pid>.tmp`` beside it, ``fsync``s it, renames it over the destination and
    ``fsync``s the folder. A failed save removes its temporary file, keeps the previous checkpoint and raises a
    :class:`RunError` that names the path; leftovers of a killed save are removed at the next save there."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the right tool there
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        partial = path.parent / f".{path.name}.{os.getpid()}.tmp"
        try:
            with partial.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except Exception as err:
            partial.unlink(missing_ok=True)
            kept = "the previous checkpoint there is kept" if path.exists() else "no checkpoint was written"
            raise RunError(f"could not save the checkpoint {path}: {err}; {kept}") from err
        _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not sync folders; the rename itself is still atomic
    finally:
        os.close(fd)


class FiniteGuard(Callback):
    """Stops a run on a non-finite training loss, gradient or monitored validation metric.

    Gradients are checked before every optimizer step (not under fp16 mixed precision, whose gradient scaler skips
    such steps itself); validation metrics before any checkpoint is saved, so a non-finite epoch is never "best".
    The error names the step, the epoch, the batch and the parameter group, and the last checkpoint saved.

    Args:
        max_skips: skip up to this many optimizer steps with non-finite gradients (no update at all) before stopping.
    """

    def __init__(self, max_skips: int = 0):
        self.max_skips = max_skips
        self.skipped = 0

    def _where(self, trainer: Trainer) -> str:
        batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1
        return f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch})"

    def _stop(self, trainer: Trainer, what: str) -> None:
        checkpoint = trainer.checkpoint_callback
        last = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
        raise RunError(f"{what}: lower the learning rate or check the data; {kept}")

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all() and self.skipped >= self.max_skips:
            self._stop(
                trainer, f"non-finite training loss ({loss.detach().float().mean().item()}) at {self._where(trainer)}"
            )

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if str(trainer.precision).startswith("16"):
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or torch.stack(torch._foreach_norm(grads)).isfinite().all():
            return
        group, name = _first_non_finite(pl_module, optimizer)
        what = f"non-finite gradient at {self._where(trainer)} in parameter group {group!r} ({name})"
        if self.skipped >= self.max_skips:
            self._stop(trainer, what)
        self.skipped += 1
        rank_zero_warn(f"{what}: step skipped ({self.skipped} of at most {self.max_skips})")
        for group_ in optimizer.param_groups:
            for p in group_["params"]:
                p.grad = None  # the optimizer leaves parameters without a gradient untouched

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        monitored = {c.monitor for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)} | {"val/loss"}
        for key in sorted(monitored):
            value = trainer.callback_metrics.get(key)
            if value is not None and not math.isfinite(float(value)):
                self._stop(trainer, f"non-finite {key} ({float(value)}) after epoch {trainer.current_epoch}")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = state_dict.get("skipped", 0)


def _first_non_finite(pl_module: LightningModule, optimizer) -> tuple[str, str]:
    names = {id(p): n for n, p in pl_module.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return group.get("name", "?"), names.get(id(p), "?")
    return "?", "?"
