"""Experiment tracking: W&B that records offline when no API key is configured, and a report of every run that
people can look at without W&B (PNG plots and CSV files in the run directory).

``WandbLogger``: Lightning's, with ``offline`` decided for you: online when an API key is configured
(``WANDB_API_KEY``, a ``.netrc`` entry or wandb's settings file), offline otherwise; ``make sync`` uploads the offline
runs later. ``WANDB_MODE`` still wins when set. The key itself is never read into the config or printed.

``RunReport`` (added to every run by ``scripts/train.py``):

* at the first training batch, a table of the named parameter groups: parameters, trainable or frozen, learning rate;
* after ``fit``: ``curves.png`` (losses and validation metrics by epoch) and ``lr.png`` (the LR of every named group
  by step), drawn from the CSV metrics;
* after ``test``: ``confusion_matrix.png`` and a sample of predictions (``test_samples.png``: images with their true
  and predicted labels; for text, ``test_samples.csv``: text, true and predicted label, probability);
* every PNG and the sample table also go to W&B as media when a W&B logger is attached; checkpoints carry the W&B run
  id, so ``fit --ckpt_path`` continues the same W&B run.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import netrc
import os
import subprocess
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only

from modules.backbones import split_by_group


def git_commit() -> str | None:
    """The repository's commit, with ``-dirty`` when files differ from it; None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def wandb_api_key_configured() -> bool:
    """Whether W&B would find an API key: ``WANDB_API_KEY``, a ``.netrc`` entry for its host, or its settings file."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    files = [os.environ.get("NETRC", ""), "~/.netrc", "~/_netrc"]
    for name in filter(None, files):
        path = Path(name).expanduser()
        try:
            if path.is_file() and netrc.netrc(str(path)).authenticators(host):
                return True
        except (netrc.NetrcParseError, OSError):
            continue
    settings = Path(os.environ.get("WANDB_CONFIG_DIR", "~/.config/wandb")).expanduser() / "settings"
    return settings.is_file() and "api_key" in settings.read_text(errors="ignore")


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` that records offline when no API key is configured (``make sync`` uploads later).

    Args:
        project: W&B project.
        name: run name.
        group: run group (for example the experiment, so that its seeds sit together).
        tags: run tags.
        save_dir: where the ``wandb/`` folder of the runs goes.
        log_model: upload checkpoints as W&B artifacts: False (default), True (at the end) or ``"all"`` (each one).
        offline: True or False to force; None decides: online when an API key is configured.
        kwargs: further ``wandb.init`` arguments (``entity``, ``notes``, ``id`` ...).
    """

    def __init__(
        self,
        project: str = "finetune-template",
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        save_dir: str = "runs",
        log_model: bool | str = False,
        offline: bool | None = None,
        **kwargs,
    ):
        if offline is None:
            offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or (
                "WANDB_MODE" not in os.environ and not wandb_api_key_configured()
            )
        # Absolute: wandb's background service may have been started from another working directory, and would
        # resolve a relative folder against its own.
        root = Path(save_dir).resolve()  # created when the run starts, not here (a fast_dev_run writes nothing)
        if kwargs.get("settings") is None:
            # Quiet: no history and summary panel when the run ends (the run's own summary has the numbers); W&B's
            # warnings, errors and where an offline run is saved still show. A `settings` given in the config wins.
            kwargs["settings"] = {"quiet": True}
        super().__init__(
            name=name,
            save_dir=str(root),
            offline=offline,
            project=project,
            log_model=log_model,
            group=group,
            tags=tags,
            **kwargs,
        )
        if self._wandb_init.get("anonymous") is None:  # Lightning passes None, which recent wandb warns is deprecated
            self._wandb_init.pop("anonymous", None)

    @property
    def experiment(self):
        if self._experiment is None:
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
        return LightningWandbLogger.experiment.fget(self)

    def resume(self, run_id: str) -> None:
        """Continue the W&B run ``run_id`` (call before the run starts)."""
        self._id = run_id
        self._wandb_init |= {"id": run_id, "resume": "allow"}


def wandb_loggers(trainer: Trainer) -> list[LightningWandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, LightningWandbLogger)]


class RichSummary(RichModelSummary):
    """Lightning's rich model summary, without the FLOPs column and total when no FLOPs were counted (Lightning counts
    them only for a model with an ``example_input_array``, and prints ``Total FLOPs: 0`` otherwise).
    ``scripts/train.py`` puts it in place of Lightning's default summary."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs,
    ) -> None:
        if total_flops:
            RichModelSummary.summarize(
                summary_data,
                total_parameters,
                trainable_parameters,
                model_size,
                total_training_modes,
                total_flops=total_flops,
                **summarize_kwargs,
            )
            return
        from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            left = name in ("Name", "Type", "Mode")
            style = "dim" if name == " " else "white" if name.endswith("sizes") else None
            table.add_column(name, justify="left" if left else "right", style=style, no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        grid = Table.grid(expand=True)
        grid.add_column()
        for label, value in (
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", total_training_modes["train"]),
            ("Modules in eval mode", total_training_modes["eval"]),
        ):
            grid.add_row(f"[bold]{label}[/]: {value}")
        console.print(grid)


def fold_wandb_loggers(entries: object) -> None:
    """Make the W&B loggers of a parsed ``trainer.logger`` list one, in place: the first, with every argument that a
    later one sets to other than its default (``configs/presets/wandb.yaml`` appends one with ``logger+``: online,
    checkpoints as artifacts, on the experiment's own run name, group, tags and other loggers)."""
    if not isinstance(entries, list):
        return
    found = [e for e in entries if str(getattr(e, "class_path", "")).endswith("WandbLogger")]
    for later in found[1:]:
        module, _, name = later.class_path.rpartition(".")
        defaults = _init_defaults(getattr(importlib.import_module(module), name))
        for key, value in vars(later.init_args).items():
            if value is not None and (key not in defaults or value != defaults[key]):
                found[0].init_args[key] = value
        entries.remove(later)


def _init_defaults(cls: type) -> dict[str, object]:
    """The default of every ``__init__`` argument of ``cls`` and its bases (a subclass's own default wins)."""
    defaults: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            for name, parameter in inspect.signature(vars(klass)["__init__"]).parameters.items():
                if parameter.default is not inspect.Parameter.empty:
                    defaults[name] = parameter.default
    return defaults


def group_table(pl_module: LightningModule, optimizer=None) -> list[dict]:
    """Rows ``{group, params, trainable, frozen, lr}`` for ``head`` and each backbone layer group (lr: the peak)."""
    lrs = {}
    if optimizer is not None:
        for group in optimizer.param_groups:
            lrs.setdefault(group.get("layer_group", group.get("name")), group.get("peak_lr", group["lr"]))
    backbone = {f"backbone.{g}": p for g, p in split_by_group(pl_module.backbone, pl_module.layer_groups).items()}
    # A head weight tied to a backbone weight (the MLM decoder and the word embeddings) is one tensor: counted once,
    # in the backbone group that owns it, as the optimizer's groups do.
    shared = {id(p) for params in backbone.values() for p in params}
    units = {"head": [p for p in pl_module.head.parameters() if id(p) not in shared]} | backbone
    rows = []
    for name, params in units.items():
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        rows.append({"group": name, "params": total, "trainable": trainable, "frozen": total - trainable})
        rows[-1]["lr"] = lrs.get(name)
    return rows


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def plot_curves(rows: list[dict[str, float]], out: Path) -> Path | None:
    """Losses (train by epoch mean of steps, val) and validation metrics against the epoch, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[float], list[float]]:
        by_epoch: dict[float, list[float]] = {}
        for row in rows:
            if key in row and "epoch" in row:
                by_epoch.setdefault(row["epoch"], []).append(row[key])
        epochs = sorted(by_epoch)
        return epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]

    keys = sorted({k for row in rows for k in row})
    losses = [k for k in ("train/loss", "val/loss") if k in keys]
    metrics = [k for k in keys if k.startswith("val/") and k != "val/loss" and not k.endswith("_best")]
    metrics = [k for k in metrics if k != "val/questions"]
    if not losses and not metrics:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, group, title in ((axes[0], losses, "loss"), (axes[1], metrics, "validation metrics")):
        for key in group:
            x, y = series(key)
            ax.plot([e + 1 for e in x], y, marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if group:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def plot_lr(rows: list[dict[str, float]], out: Path) -> Path | None:
    """The learning rate of every named parameter group against the step (``.no_wd`` twins left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for row in rows for k in row if k.startswith("lr-") and not k.endswith(".no_wd")})
    if not keys:
        return None
    figure, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(row["step"], row[key]) for row in rows if key in row and "step" in row]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=key.split("/", 1)[-1])
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def plot_confusion(matrix: torch.Tensor, names: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    size = min(14, 2 + 0.45 * n)
    figure, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix.numpy(), cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        for i in range(n):
            for j in range(n):
                value = int(matrix[i, j])
                if value:
                    color = "white" if value > matrix.max() / 2 else "black"
                    ax.text(j, i, value, ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def plot_image_samples(images: torch.Tensor, true: list[str], pred: list[str], out: Path) -> Path:
    """A grid of images (N, C, H, W in [0, 1]) titled ``true -> predicted`` (red when wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(images))
    rows = (len(images) + cols - 1) // cols
    figure, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, t, p in zip(axes.flat, images, true, pred, strict=False):
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(f"{t} -> {p}", fontsize=8, color="black" if t == p else "red")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


class RunReport(Callback):
    """Group table, PNG plots, sample predictions, and the same as W&B media (see the module docstring).

    Args:
        samples: predictions shown in the test sample grid or table.
    """

    def __init__(self, samples: int = 16):
        self.samples = samples
        self._shown_groups = False
        self._sample_batch = None

    # The parameter groups, once the freezing strategy has set the first phase.
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self._shown_groups or not hasattr(pl_module, "layer_groups") or pl_module.head is None:
            return
        self._shown_groups = True
        rows = group_table(pl_module, trainer.optimizers[0] if trainer.optimizers else None)
        if trainer.is_global_zero:
            _print_group_table(rows)
        for logger in wandb_loggers(trainer):
            logger.log_table(
                "parameter_groups", ["group", "params", "trainable", "frozen", "lr"], [list(r.values()) for r in rows]
            )

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        loggers = wandb_loggers(trainer)
        if loggers and loggers[0].version:
            checkpoint["wandb_run_id"] = loggers[0].version

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = run_dir(trainer)
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if log_dir is None or csv_logger is None:
            return
        csv_logger.save()
        metrics = Path(csv_logger.log_dir) / "metrics.csv"
        if not metrics.is_file():
            return
        rows = read_metrics_csv(metrics)
        for key, path in (
            ("curves", plot_curves(rows, log_dir / "curves.png")),
            ("lr", plot_lr(rows, log_dir / "lr.png")),
        ):
            if path is not None:
                _log_image(trainer, f"plots/{key}", path)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and self._sample_batch is None:
            self._sample_batch = batch

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batch, self._sample_batch = self._sample_batch, None
        names = list(pl_module.hparams.get("class_names") or [])
        probs = None
        if batch is not None and names and hasattr(pl_module, "split_batch"):
            # Every rank runs this forward pass: under FSDP a forward pass is a collective (all-gathers).
            probs = self._predict(pl_module, batch)
        log_dir = run_dir(trainer)
        if not trainer.is_global_zero or log_dir is None:
            return
        for name, text in getattr(pl_module, "test_artifacts", dict)().items():  # the task protocol's files
            (log_dir / name).write_text(text, encoding="utf-8")
        matrix = getattr(pl_module, "confusion_matrix", None)
        if matrix is not None and names:
            _log_image(
                trainer, "test/confusion_matrix", plot_confusion(matrix, names, log_dir / "confusion_matrix.png")
            )
        if probs is not None:
            self._samples(trainer, pl_module, batch, probs, names, log_dir)

    @torch.no_grad()
    def _predict(self, pl_module: LightningModule, batch) -> torch.Tensor | None:
        """The class probabilities of the first ``samples`` examples of ``batch`` (None for multi-label models)."""
        if getattr(pl_module, "multi_label", False):
            return None
        inputs, _ = pl_module.split_batch(batch)
        was_training = pl_module.training
        pl_module.eval()
        probs = pl_module(inputs).softmax(-1)[: self.samples].cpu()
        pl_module.train(was_training)
        return probs

    def _samples(
        self, trainer: Trainer, pl_module, batch, probs: torch.Tensor, names: list[str], log_dir: Path
    ) -> None:
        inputs, labels = pl_module.split_batch(batch)
        labels = labels[: self.samples].cpu().tolist()
        preds = probs.argmax(-1).tolist()
        true_names, pred_names = [names[i] for i in labels], [names[i] for i in preds]
        if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:  # images in [0, 1]
            path = plot_image_samples(
                inputs[: self.samples].float().cpu(), true_names, pred_names, log_dir / "test_samples.png"
            )
            _log_image(trainer, "test/samples", path)
            return
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None or "input_ids" not in inputs:
            return
        head = {key: values[: self.samples] for key, values in inputs.items()}
        texts_of = getattr(trainer.datamodule, "texts_of", None)  # the original texts (decoded ids are lowercased)
        texts = texts_of(head) if texts_of else tokenizer.batch_decode(head["input_ids"], skip_special_tokens=True)
        rows = [
            [text, t, p, round(float(row.max()), 4)]
            for text, t, p, row in zip(texts, true_names, pred_names, probs, strict=False)
        ]
        columns = ["text", "true", "predicted", "probability"]
        with (log_dir / "test_samples.csv").open("w", newline="") as f:
            csv.writer(f).writerows([columns, *rows])
        for logger in wandb_loggers(trainer):
            logger.log_table("test/samples", columns, rows)


def run_dir(trainer: Trainer) -> Path | None:
    """The run's directory, or None when no logger runs or in a ``fast_dev_run`` (``trainer.log_dir`` is then the
    working directory or ``default_root_dir``, where a run's files do not belong).

    Read from the first logger, as ``trainer.log_dir`` does, but without its broadcast: a collective called on rank 0
    alone (from a rank-zero-only hook) would wait for the other ranks forever.
    """
    if trainer.fast_dev_run or not trainer.loggers:
        return None
    first = trainer.loggers[0]
    folder = first.log_dir if isinstance(first, CSVLogger | TensorBoardLogger) else first.save_dir
    return Path(folder) if folder else None


def _log_image(trainer: Trainer, key: str, path: Path) -> None:
    for logger in wandb_loggers(trainer):
        logger.log_image(key, [str(path)])


def _print_group_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="parameter groups at the first step (lr: peak of the schedule)")
    for column in ("group", "params", "trainable", "frozen", "lr"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for row in rows:
        lr = "-" if row["lr"] is None else f"{row['lr']:.2e}"
        table.add_row(row["group"], f"{row['params']:,}", f"{row['trainable']:,}", f"{row['frozen']:,}", lr)
    Console().print(table)
