"""The learning rate as a pure function of training progress, written into every parameter group.

Why not a torch LR scheduler: torch schedulers keep state (their ``base_lrs`` and last epoch) that goes wrong when
parameter groups change mid-run or a run resumes (Lightning #8720, #14674; Flash #1321; transformers #20029).
Here each group keeps its own peak LR (``group["peak_lr"]``, saved with the optimizer state) and, before every
optimizer step, its LR becomes ``peak_lr * lr_factor(step, ...)``. Nothing else is kept, so resume is correct by
construction and every group follows the same shape at its own scale (discriminative learning rates).
"""

from __future__ import annotations

import math
from typing import Literal

from lightning import Callback, LightningModule, Trainer

Schedule = Literal["cosine", "linear", "constant", "onecycle"]


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, schedule: Schedule = "cosine", min_ratio: float = 0.0
) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup from ``1 / (warmup_steps + 1)`` to 1 over ``warmup_steps`` steps, then ``cosine`` or ``linear``
    decay to ``min_ratio`` at the last step, or ``constant``. ``onecycle`` is fastai's shape: a cosine rise from
    1/25 over the warmup, then a cosine fall to ``min_ratio``.
    """
    if step < warmup_steps:
        if schedule == "onecycle":
            return 1 / 25 + (1 - 1 / 25) * (1 - math.cos(math.pi * step / warmup_steps)) / 2
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2


class LRSchedule(Callback):
    """Warmup, then cosine / linear / constant / one-cycle decay, for every parameter group at its own peak LR.

    The peak LR of a group is the LR it had when training started (what ``configure_optimizers`` wrote); the
    schedule counts optimizer steps, so gradient accumulation is honoured.

    Args:
        schedule: ``cosine``, ``linear``, ``constant`` or ``onecycle``.
        warmup: warmup length: a fraction of the run if below 1, else a number of optimizer steps.
        min_ratio: LR at the end of the decay, as a fraction of each group's peak.
    """

    def __init__(self, schedule: Schedule = "cosine", warmup: float = 0.05, min_ratio: float = 0.0):
        if schedule not in ("cosine", "linear", "constant", "onecycle"):
            raise ValueError(f"LRSchedule.schedule is {schedule!r}; choose cosine, linear, constant or onecycle")
        if warmup < 0 or not 0 <= min_ratio <= 1:
            raise ValueError(f"LRSchedule needs warmup >= 0 and 0 <= min_ratio <= 1, got {warmup} and {min_ratio}")
        self.schedule, self.warmup, self.min_ratio = schedule, warmup, min_ratio

    def warmup_steps(self, total: int) -> int:
        """Warmup length in optimizer steps for a run of ``total`` steps; longer than the run is an error."""
        warmup = round(self.warmup * total) if self.warmup < 1 else int(self.warmup)
        if warmup >= total:
            raise ValueError(f"LRSchedule.warmup is {warmup} steps but the whole run has only {total} optimizer steps")
        return warmup

    def factor(self, step: int, total: int) -> float:
        """The schedule's multiplier of each group's peak LR at optimizer step ``step`` of ``total``."""
        return lr_factor(step, total, self.warmup_steps(total), self.schedule, self.min_ratio)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._total = int(trainer.estimated_stepping_batches)
        self._warmup = self.warmup_steps(self._total)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("peak_lr", group["lr"])  # kept across resume: it lives in the optimizer state
                if group["peak_lr"] <= 0:
                    raise ValueError(f"parameter group {group.get('name', '?')!r} has a learning rate <= 0")
        self._apply(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self._apply(trainer)

    def _apply(self, trainer: Trainer) -> None:
        factor = lr_factor(trainer.global_step, self._total, self._warmup, self.schedule, self.min_ratio)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
