"""A global batch size that stays the same when the number of devices or nodes changes.

:class:`GlobalBatchSize` sets ``accumulate_grad_batches`` so that one optimizer step always sees ``size`` samples:

    size = per-device batch (the data module's ``batch_size``) x devices x nodes x accumulation

The LR rule: learning rates, warm-up and schedules are stated for the global batch, and the global batch does not
change, so neither do they: moving a run from 1 GPU to 8 (or to 4 nodes) changes how the batch is computed, not the
optimisation (the number of optimizer steps per epoch and the LR at each of them stay the same). Without this
callback the global batch grows with the device count and the LR should be scaled with it (linearly for SGD, by
the square root for Adam-style optimizers as a starting point), which is a different recipe; this callback keeps
the recipe. The per-device batch is what memory allows; lower ``data.batch_size`` when a device runs out of memory,
and the accumulation grows to keep ``size``.

Set it in an experiment or on the command line::

    --trainer.callbacks+=callbacks.scaling.GlobalBatchSize --trainer.callbacks.init_args.size=256
"""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


def per_device_batch_size(datamodule) -> int | None:
    """The training batch size a data module gives each device (its ``batch_size`` argument), or None."""
    for holder in (getattr(datamodule, "hparams", None), getattr(datamodule, "options", None), datamodule):
        value = getattr(holder, "batch_size", None) if holder is not None else None
        if value is None and isinstance(holder, dict):
            value = holder.get("batch_size")
        if isinstance(value, int):
            return value
    return None


def accumulation_for(size: int, batch_size: int, devices: int, nodes: int) -> int:
    """The gradient accumulation that makes ``size`` from ``batch_size`` on ``devices`` x ``nodes``; a
    ``ValueError`` (one line) when ``size`` is not a multiple of what one accumulation step computes."""
    per_step = batch_size * devices * nodes
    if size < per_step or size % per_step:
        raise ValueError(
            f"GlobalBatchSize(size={size}) is not a multiple of data.batch_size={batch_size} x {devices} devices x "
            f"{nodes} nodes = {per_step} samples per accumulation step: choose a batch size that divides "
            f"{size // (devices * nodes) if size >= devices * nodes else size} or another global size"
        )
    return size // per_step


class GlobalBatchSize(Callback):
    """Keep the global batch (samples per optimizer step) at ``size`` on any number of devices and nodes, by
    gradient accumulation (see the module docstring for the LR rule).

    Args:
        size: samples per optimizer step, over every device and accumulation step.
    """

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"GlobalBatchSize.size must be >= 1, got {size}")
        self.size = size
        self.accumulate = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        batch_size = per_device_batch_size(trainer.datamodule)
        if batch_size is None:
            raise ValueError(
                "GlobalBatchSize needs the data module's batch size (a batch_size argument); this data module "
                f"({type(trainer.datamodule).__name__}) has none"
            )
        if trainer.accumulate_grad_batches != 1 and self.accumulate is None:
            raise ValueError(
                f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} and GlobalBatchSize both set the "
                "accumulation: give one of them"
            )
        self.accumulate = accumulation_for(self.size, batch_size, trainer.num_devices, trainer.num_nodes)
        trainer.accumulate_grad_batches = self.accumulate
        rank_zero_info(
            f"global batch {self.size} = {batch_size} per device x {trainer.num_devices} devices x "
            f"{trainer.num_nodes} nodes x {self.accumulate} accumulated"
        )
