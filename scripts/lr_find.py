"""Lightning's LR finder, run on an experiment with its fine-tuning engine.

    python scripts/lr_find.py --config configs/digits.yaml [--trainer.max_epochs=... other overrides]
    make lr-find EXP=digits

Lightning's finder sweeps one LR for all parameter groups, which would erase the discriminative learning rates of
the engine. Here the sweep drives the head's LR and every other group keeps its configured ratio to it (the ratio
of their peak LRs), so the suggestion is directly the value for ``model.lr``. The freezing strategy's first phase
(epoch 0) is in force during the sweep: with a frozen backbone, it finds the head's LR. The finder owns the LR
during the sweep, so ``LRSchedule`` does not act. Prints the suggestion and saves the plot as a PNG.
"""

from __future__ import annotations

from pathlib import Path

from lightning import LightningModule, Trainer
from lightning.pytorch.tuner import Tuner

from callbacks.tracking import wandb_loggers
from callbacks.unfreezing import BackboneFreezing
from scripts.train import main


def engage_engine_during_sweep(trainer: Trainer, model: LightningModule) -> None:
    """Make the sweep run in the engine's first phase, with every group at its configured ratio to the head.

    Lightning's finder replaces all trainer callbacks by its own during the sweep (``__lr_finder_reset_params``),
    so the freezing strategy cannot act through its hooks and the finder's scheduler writes one LR into every group.
    The module's own ``on_train_batch_start`` still runs after the finder's callback and before the optimizer step:
    this wraps it, for this one model object, to apply the epoch-0 freezing phase and the LR ratios.
    """
    freezing = [c for c in trainer.callbacks if isinstance(c, BackboneFreezing)]
    original = model.on_train_batch_start
    ratios: list[float] = []

    def on_train_batch_start(batch, batch_idx: int):
        if not ratios:  # the configured LRs, relative to the head's (group 0: the swept LR)
            optimizer = model.configure_optimizers()
            groups = (optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer).param_groups
            ratios.extend(g["lr"] / groups[0]["lr"] for g in groups)
        for strategy in freezing:
            if batch_idx == 0 and trainer.global_step == 0:
                strategy.on_train_epoch_start(trainer, model)
            strategy.on_train_batch_start(trainer, model, batch, batch_idx)
        param_groups = trainer.optimizers[0].param_groups
        for group, ratio in zip(param_groups, ratios, strict=True):
            group["lr"] = param_groups[0]["lr"] * ratio
        return original(batch, batch_idx)

    model.on_train_batch_start = on_train_batch_start


def lr_find(
    args: list[str] | None = None,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    num_training: int = 100,
    plot_path: str | None = None,
) -> tuple[float | None, Path]:
    """Run the sweep on the experiment given by ``args``; return the suggested head LR and the plot's path."""
    cli = main(args, run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    engage_engine_during_sweep(trainer, model)
    finder = Tuner(trainer).lr_find(
        model, datamodule=data, min_lr=min_lr, max_lr=max_lr, num_training=num_training, update_attr=False
    )
    suggestion = finder.suggestion()
    out = Path(plot_path) if plot_path else Path(trainer.log_dir or "runs") / "lr_find.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = finder.plot(suggest=suggestion is not None)
    figure.savefig(out, dpi=120, bbox_inches="tight")
    for logger in wandb_loggers(trainer):  # the plot as W&B media, with the suggestion
        logger.log_image("lr_find", [str(out)], caption=[f"suggested head lr: {suggestion}"])
        logger.experiment.finish()
    print(f"suggested model.lr (head; other groups keep their ratio): {suggestion}")
    print(f"plot: {out}")
    return suggestion, out


if __name__ == "__main__":
    lr_find()
