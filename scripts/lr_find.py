"""Lightning's LR finder, run on an experiment with its fine-tuning engine.

    python scripts/lr_find.py --config configs/digits.yaml [--trainer.max_epochs=... other overrides]
    make lr-find EXP=digits

Lightning's finder sweeps one LR for all parameter groups, which would erase the discriminative learning rates of
the engine. Here the sweep drives the head's LR and every other group keeps its configured ratio to it (the ratio
of their peak LRs), so the suggestion is directly the value for ``model.lr``. The freezing strategy's first phase
(epoch 0) is in force during the sweep: with a frozen backbone, it finds the head's LR. The finder owns the LR
during the sweep, so ``LRSchedule`` does not act. Prints the suggestion (a tenth of the LR at the loss minimum,
see :func:`valley`) and saves the plot as a PNG.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from lightning import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.tuner import Tuner

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


def valley(lrs: list[float], losses: list[float], divisor: float = 10.0, skip_start: int = 10) -> float | None:
    """A tenth of the LR at which the (smoothed) loss is lowest: fastai's ``minimum / 10`` rule.

    Lightning's own suggestion, the point of steepest descent, lands at the very start of the descent on a short
    sweep whose loss is noisy: measured on the default experiment it was 180x below the LR that trains best. The
    minimum of the loss is where the LR becomes too large; a tenth of it is the largest LR that is still safely below
    that edge (Smith 2017, fastai). The first ``skip_start`` points are ignored, as Lightning's own rule does: the
    loss of the first few batches is not yet the trend.
    """
    points = [(lr, loss) for lr, loss in list(zip(lrs, losses, strict=True))[skip_start:] if math.isfinite(loss)]
    if not points:
        return None
    best_lr, _ = min(points, key=lambda point: point[1])
    return best_lr / divisor


def lr_find(
    args: list[str] | None = None,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    num_training: int = 60,
    plot_path: str | None = None,
) -> tuple[float | None, Path]:
    """Run the sweep on the experiment given by ``args``; return the suggested head LR and the plot's path.

    The sweep runs without the experiment's loggers (it is no run: it takes no ``version_N``) and stops early when
    the loss diverges (4x its best). The plot goes to ``runs/lr_find/<experiment>.png`` unless ``plot_path`` says.
    """
    args = list(args or sys.argv[1:])
    configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    cli = main([*args, "--trainer.logger=false"], run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    # No run: without a logger the config would be saved into the working directory.
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, SaveConfigCallback)]
    engage_engine_during_sweep(trainer, model)
    finder = Tuner(trainer).lr_find(
        model,
        datamodule=data,
        min_lr=min_lr,
        max_lr=max_lr,
        num_training=num_training,
        early_stop_threshold=4.0,
        update_attr=False,
    )
    suggestion = valley(finder.results["lr"], finder.results["loss"])
    name = Path(configs[0]).stem if configs else "experiment"
    out = Path(plot_path) if plot_path else Path("runs") / "lr_find" / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = finder.plot(suggest=False)  # Lightning's marker would be its own suggestion: mark ours
    if suggestion is not None:
        lrs, losses = finder.results["lr"], finder.results["loss"]
        nearest = min(range(len(lrs)), key=lambda i: abs(math.log(lrs[i] / suggestion)))
        figure.axes[0].plot(lrs[nearest], losses[nearest], marker="o", markersize=10, color="red")
    figure.savefig(out, dpi=120, bbox_inches="tight")
    print(f"suggested model.lr (head; other groups keep their ratio): {suggestion}")
    print(f"plot: {out}")
    return suggestion, out


if __name__ == "__main__":
    lr_find()
