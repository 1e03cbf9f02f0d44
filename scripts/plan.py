"""Print an experiment's fine-tuning plan without training: for each phase, every layer group, its parameter count,
whether it trains, and its learning rate at the phase's first step.

    python scripts/plan.py --config configs/digits.yaml [--trainer.max_epochs=8 ...]
    make plan EXP=digits
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from callbacks.lr_schedule import LRSchedule
from callbacks.unfreezing import BackboneFreezing, NoFreeze
from scripts.train import main


def steps_per_epoch(trainer, batches: int) -> int:
    """Optimizer steps in one epoch, as Lightning counts them (limit_train_batches, gradient accumulation)."""
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    return math.ceil(batches / trainer.accumulate_grad_batches)


def plan(args: list[str] | None = None, console: Console | None = None) -> list[dict]:
    """Build the experiment's model, data and trainer from ``args`` and print its plan; return the phases."""
    console = console or Console()
    cli = main(args, run=False)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    data.prepare_data()
    data.setup("fit")
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer

    units: dict[str, dict] = {}  # layer group -> parameter count and peak LR
    for group in optimizer.param_groups:
        unit = units.setdefault(group["layer_group"], {"params": 0, "lr": group["lr"]})
        unit["params"] += sum(p.numel() for p in group["params"])

    freezing = next((c for c in trainer.callbacks if isinstance(c, BackboneFreezing)), NoFreeze("train"))
    schedule = next((c for c in trainer.callbacks if isinstance(c, LRSchedule)), None)
    per_epoch = steps_per_epoch(trainer, len(data.train_dataloader()))
    max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    total = per_epoch * max_epochs
    if trainer.max_steps and trainer.max_steps > 0:
        total = min(total, trainer.max_steps)
    groups = list(model.layer_groups)

    console.print(
        f"[bold]{type(model).__name__}[/] with {type(freezing).__name__} (BatchNorm: {freezing.bn_policy}), "
        f"{type(optimizer).__name__}, {max_epochs} epochs x {per_epoch} optimizer steps = {total} steps"
        + (f", {schedule.schedule} schedule with {schedule.warmup_steps(total)} warmup steps" if schedule else "")
    )
    if getattr(model, "lora", None) is not None:
        named = dict(model.backbone.named_parameters())
        adapters = sum(p.numel() for n, p in named.items() if n not in model.frozen_base)
        base = sum(named[n].numel() for n in model.frozen_base)
        kinds = sorted({name.rsplit(".", 1)[-1] for name in model.adapted_layers})
        console.print(
            f"LoRA r={model.lora.r}, alpha={model.lora.alpha} on {len(model.adapted_layers)} layers "
            f"({', '.join(kinds)}): the backbone groups below hold {adapters:,} adapter parameters; its "
            f"{base:,} base parameters stay frozen"
        )
    options = getattr(model, "compile_options", None)
    if options is not None:
        count = len(freezing.phases(groups, max_epochs))
        console.print(
            f"torch.compile on the backbone ({', '.join(f'{k}={v}' for k, v in options.items()) or 'defaults'}), "
            f"in place (plain checkpoint keys): compiled for each of the {count} phase(s) below, whose first "
            "steps pay the compilation"
        )
    phases = []
    for epoch, trainable in freezing.phases(groups, max_epochs):
        step = epoch * per_epoch
        factor = schedule.factor(step, total) if schedule else 1.0
        table = Table(title=f"phase from epoch {epoch} (step {step})", title_justify="left")
        for column in ("layer group", "parameters", "state", "LR at phase start"):
            table.add_column(column, justify="left" if column in ("layer group", "state") else "right")
        rows = {}
        for unit, info in units.items():
            trains = unit == "head" or unit.removeprefix("backbone.") in trainable
            lr = info["lr"] * factor
            rows[unit] = {"params": info["params"], "trainable": trains, "lr": lr}
            table.add_row(unit, f"{info['params']:,}", "train" if trains else "frozen", f"{lr:.3g}")
        trainable_count = sum(r["params"] for r in rows.values() if r["trainable"])
        table.caption = f"trainable parameters: {trainable_count:,} of {sum(r['params'] for r in rows.values()):,}"
        console.print(table)
        phases.append({"epoch": epoch, "step": step, "groups": rows})
    return phases


if __name__ == "__main__":
    plan()
