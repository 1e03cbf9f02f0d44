"""The trial side of ``make sweep``: report the monitored validation metric of every epoch to the Optuna study, and
stop the run when the study's pruner says the trial is worse than the others at that point.

``scripts/sweep.py`` adds this callback to each trial's config. The study lives in SQLite, so the trial (a separate
process, one run per trial) opens it by name. Under DDP rank 0 alone reports and asks the pruner, and the decision is
broadcast, so every rank stops at the same epoch (one trial per run, not one per rank).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lightning import Callback, LightningModule, Trainer


def make_pruner(name: str, warmup_epochs: int = 1, startup_trials: int = 3):
    """The Optuna pruner ``median`` (stop below the median of earlier trials at the same epoch), ``asha``
    (successive halving) or ``none``."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, warmup_epochs))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}; choose median, asha or none")


class OptunaPruning(Callback):
    """Reports ``monitor`` after each validation to trial ``trial_number`` of an Optuna study and stops pruned trials.

    Args:
        storage: the study's storage URL (``sqlite:///runs/sweeps/<exp>/study.db``).
        study_name: the study's name.
        trial_number: this run's trial.
        monitor: the validation metric the study optimizes.
        pruner: ``median``, ``asha`` or ``none`` (see :func:`make_pruner`).
        warmup_epochs: epochs before a trial may be pruned.
        startup_trials: trials that run to the end before the median pruner prunes any.
        step_offset: added to the epoch when reporting (the fold's first step when a trial runs several folds).
        status_file: where the trial's outcome is written (``{"pruned": bool, "epoch": int}``) for the sweep.
    """

    def __init__(
        self,
        storage: str,
        study_name: str,
        trial_number: int,
        monitor: str = "val/acc",
        pruner: str = "median",
        warmup_epochs: int = 1,
        startup_trials: int = 3,
        step_offset: int = 0,
        status_file: str | None = None,
    ):
        self.storage, self.study_name, self.trial_number = storage, study_name, trial_number
        self.monitor, self.pruner, self.step_offset = monitor, pruner, step_offset
        self.warmup_epochs, self.startup_trials, self.status_file = warmup_epochs, startup_trials, status_file
        self._trial = None

    def _open(self):
        import optuna

        study = optuna.load_study(
            study_name=self.study_name,
            storage=self.storage,
            pruner=make_pruner(self.pruner, self.warmup_epochs, self.startup_trials),
        )
        trial_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == self.trial_number)
        return optuna.trial.Trial(study, trial_id)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                raise ValueError(f"the sweep monitors {self.monitor!r}, which this run does not log")
            value = float(value)
            if math.isfinite(value):
                self._trial = self._trial or self._open()
                self._trial.report(value, self.step_offset + trainer.current_epoch)
                prune = self._trial.should_prune()
        prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            trainer.should_stop = True
            if trainer.is_global_zero:
                self._write(pruned=True, epoch=trainer.current_epoch)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and not self._pruned():
            self._write(pruned=False, epoch=trainer.current_epoch)

    def _pruned(self) -> bool:
        path = Path(self.status_file) if self.status_file else None
        return bool(path and path.is_file() and json.loads(path.read_text()).get("pruned"))

    def _write(self, pruned: bool, epoch: int) -> None:
        if self.status_file:
            Path(self.status_file).write_text(json.dumps({"pruned": pruned, "epoch": epoch}))
