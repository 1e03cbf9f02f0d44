"""Train, validate, test and predict from a YAML experiment: a LightningCLI.

    python scripts/train.py fit --config configs/digits.yaml [--trainer.max_epochs=2 ...]
    python scripts/train.py test --config configs/digits.yaml --ckpt_path runs/digits/version_0/checkpoints/last.ckpt
    python scripts/train.py fit --config configs/digits.yaml --print_config

Any LightningModule and LightningDataModule can be named with ``class_path`` in the config. The resolved config is
saved as ``config.yaml`` in the run directory, beside its ``checkpoints/``. After ``fit`` the best checkpoint is
tested (``--test_after_fit=false`` to skip) and a short summary is printed.

Every run gets its own folder ``<save_dir>/<name>/version_N``, claimed atomically. To continue a run where it
stopped, in the same folder, ``metrics.csv`` and W&B run (``make resume RUN=...``)::

    python scripts/train.py fit --config runs/digits/version_3/config.yaml --run runs/digits/version_3
    python scripts/train.py fit --config configs/digits.yaml --ckpt_path last   # the newest run of the experiment

A checkpoint given with ``--ckpt_path`` that lies in a run's ``checkpoints/`` continues that run too. Mistakes print
one line (``error: ...``); ``--debug`` (or ``FT_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml
from lightning import LightningDataModule, LightningModule
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.reliability import AtomicCheckpointIO, Checkpoint, EpochSeed, FiniteGuard, RunError
from callbacks.tracking import RunReport, git_commit, run_dir, wandb_loggers
from scripts.run_folders import (
    RUN_ENV,
    checkpoint_position,
    claim_run_dir,
    is_launched_child,
    metrics_before,
    newest_resumable,
    restore_metrics,
    run_of_checkpoint,
)

FOLDER_LOGGERS = ("CSVLogger", "TensorBoardLogger")  # loggers whose save_dir/name/version make the run folder

# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per run: noise, not a user's concern.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class SaveConfig(SaveConfigCallback):
    """Writes ``config.yaml`` to the run directory (Lightning's), and logs the resolved config and the git commit to
    every W&B logger."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        commit = git_commit()
        folder = run_dir(trainer)  # not trainer.log_dir: this runs on rank 0 only, and that is a collective
        if folder and commit:
            (folder / "git_commit.txt").write_text(commit + "\n")
        loggers = wandb_loggers(trainer)
        if loggers:
            resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in loggers:
                logger.experiment.config.update({"config": resolved, "git_commit": commit}, allow_val_change=True)


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True, help="Test the best checkpoint after fit.")
        parser.add_argument(
            "--run",
            type=str | None,
            default=None,
            help="Continue the run in this folder (runs/<exp>/version_N): from its checkpoints/last.ckpt unless "
            "--ckpt_path is given, in the same folder, metrics.csv and W&B run.",
        )
        parser.add_argument(
            "--results_file", type=str | None, default=None, help="Write the summary of fit (and test) as JSON here."
        )
        parser.add_argument(
            "--oof_file",
            type=str | None,
            default=None,
            help="After fit, write the last weights' predictions on the validation split as CSV here (the "
            "out-of-fold predictions of `make cv`; classifiers whose data module has folds).",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._kept_metrics = None
        if config.trainer.get("fast_dev_run"):
            return  # Lightning runs it without loggers; nothing may be written
        loggers = _folder_loggers(config.trainer.get("logger"))
        run = self._resume_target(config, loggers) if self.subcommand == "fit" else None
        if run is None and loggers:
            if is_launched_child():  # a DDP rank started by the launcher: the folder rank 0 claimed
                run = Path(os.environ[RUN_ENV]) if RUN_ENV in os.environ else None
            else:
                first = loggers[0]
                root = Path(first.get("save_dir") or "lightning_logs") / (first.get("name") or "")
                version = first.get("version")
                named = (
                    None if version is None else root / (version if isinstance(version, str) else f"version_{version}")
                )
                if named is not None and self.subcommand == "fit" and not (named / "config.yaml").exists():
                    run = named  # a new folder named in the config (a sweep's trial_003): that one
                    run.mkdir(parents=True, exist_ok=True)
                else:  # a run's saved config names its own, used folder: a new run gets a new one
                    run = claim_run_dir(root)
        if run is None:
            return
        run = run.resolve()  # one spelling of the folder: ModelCheckpoint knows its own last.ckpt by its path
        os.environ[RUN_ENV] = str(run)
        for init_args in loggers:
            init_args.save_dir, init_args.name, init_args.version = str(run.parent.parent), run.parent.name, run.name

    def _resume_target(self, config, loggers: list) -> Path | None:
        """The run folder a ``fit`` continues (``--run``, ``--ckpt_path last`` or a checkpoint inside a run), with
        ``ckpt_path`` set to the checkpoint to resume from; None for a new run."""
        ckpt, run = config.get("ckpt_path"), config.get("run")
        if run is not None:
            run = Path(run)
            if not run.is_dir():
                raise RunError(f"--run {run}: no such run folder")
            if ckpt in (None, "last"):
                ckpt = run / "checkpoints" / "last.ckpt"
                if not ckpt.is_file():
                    raise RunError(f"--run {run}: it has no checkpoints/last.ckpt to resume from")
        elif ckpt == "last":
            first = loggers[0] if loggers else {}
            root = Path(first.get("save_dir") or "lightning_logs") / (first.get("name") or "")
            run = newest_resumable(root)
            if run is None:
                raise RunError(
                    f"--ckpt_path last: no run under {root} has a checkpoints/last.ckpt; "
                    "give --run <run folder> or --ckpt_path <checkpoint file>"
                )
            ckpt = run / "checkpoints" / "last.ckpt"
        elif ckpt is not None:
            if not Path(ckpt).is_file():
                raise RunError(f"--ckpt_path {ckpt}: no such checkpoint file")
            run = run_of_checkpoint(Path(ckpt))
        if ckpt is None:
            return None
        try:
            epoch, step = checkpoint_position(Path(ckpt))
        except Exception as err:
            raise RunError(f"checkpoint {ckpt} cannot be read ({type(err).__name__}: {err})") from None
        config.ckpt_path = str(ckpt)
        if run is not None:
            run = run.resolve()
            rank_zero_info(f"resuming {run} from {Path(ckpt).name} (epoch {epoch}, step {step})")
            self._kept_metrics = metrics_before(run / "metrics.csv", epoch, step)
        return run

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.callbacks:
            if type(callback) is ModelCheckpoint:  # same arguments, plus last.ckpt every epoch
                callback.__class__ = Checkpoint
        for kind in (RunReport, EpochSeed, FiniteGuard):  # plots, exact resume, NaN guard: every run
            if not any(isinstance(c, kind) for c in trainer.callbacks):
                trainer.callbacks.append(kind())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()
        if self._kept_metrics:  # Lightning deletes metrics.csv when it opens the folder: put the rows back
            for logger in self.trainer.loggers:
                if isinstance(logger, CSVLogger) and self.trainer.is_global_zero:
                    restore_metrics(logger.experiment, *self._kept_metrics)
        ckpt_path = self.config_init["fit"].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            # Resuming: continue the W&B run that wrote the checkpoint.
            run_id = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("wandb_run_id")
            for logger in wandb_loggers(self.trainer):
                if run_id and hasattr(logger, "resume"):
                    logger.resume(run_id)

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.interrupted:
            return
        wall = time.perf_counter() - self._fit_started
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
        results = {}
        tested_weights = best or "last"
        if self.config_init[self.subcommand].get("test_after_fit", True):
            if getattr(self.datamodule, "test_is_val", False):
                # The checkpoint was chosen on these very examples: its score on them would be optimistic.
                tested_weights = "last"
                rank_zero_warn(
                    "the test split is the validation data (the data module has no test split of its own): testing "
                    "the last weights, not the checkpoint chosen on that data; give the data module a test split "
                    "for a score that nothing was chosen on"
                )
            ckpt_path = None if tested_weights == "last" else tested_weights
            tested = trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False)
            results = tested[0] if tested else {}
        # What scripts/compare.py and scripts/recipes.py read after an in-process run.
        self.results = {"test": results, "best_checkpoint": best, "tested": tested_weights, "wall_s": wall}
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_score is not None:
            self.results["best_" + checkpoint.monitor] = checkpoint.best_model_score.item()
        settings = self.config_init[self.subcommand]
        if settings.get("oof_file"):
            self._write_out_of_fold(Path(settings["oof_file"]))
        if trainer.is_global_zero:
            if settings.get("results_file"):
                Path(settings["results_file"]).parent.mkdir(parents=True, exist_ok=True)
                Path(settings["results_file"]).write_text(json.dumps(self.results, indent=1))
            _print_summary(trainer, checkpoint, best, results, wall, tested_weights)

    def _write_out_of_fold(self, path: Path) -> None:
        """The validation split's predictions by the model as it is now (the last weights, as fit left them)."""
        keys = getattr(self.datamodule, "val_keys", None)
        names = list(getattr(self.model, "hparams", {}).get("class_names") or [])
        if keys is None or not names:
            rank_zero_warn(f"--oof_file {path}: this data module has no folds or the model no class names; skipped")
            return
        batches = self.trainer.predict(self.model, dataloaders=self.datamodule.val_dataloader())
        probs = torch.cat([b["probs"] for b in batches]).float()
        if not self.trainer.is_global_zero:
            return
        fold = getattr(self.datamodule, "fold", None)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["key", "fold", "label", "pred", *[f"p_{n}" for n in names]])
            for (key, label), row in zip(keys, probs.tolist(), strict=True):
                writer.writerow([key, fold, label, names[row.index(max(row))], *row])


def _print_summary(trainer, checkpoint, best: str, results: dict, wall: float, tested: str) -> None:
    lines = [f"fit wall time: {wall:.1f} s ({trainer.current_epoch} epochs)"]
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_score is not None:
        lines.append(f"best {checkpoint.monitor}: {checkpoint.best_model_score.item():.4f}")
    if results:
        lines.append(f"tested weights: {'the last ones' if tested == 'last' else 'the best checkpoint'}")
    lines += [f"{key}: {value:.4f}" for key, value in sorted(results.items())]
    if best:
        lines.append(f"best checkpoint: {best}")
    if run_dir(trainer):
        lines.append(f"run directory: {run_dir(trainer)}")
    print("\n".join(["", "=== summary ===", *lines]), flush=True)


def main(args: list[str] | None = None, run: bool = True) -> TrainCLI:
    """Run the CLI on ``args`` (default: the command line); ``run=False`` only builds the objects (no subcommand)."""
    cli = TrainCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=42,
        save_config_callback=SaveConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
    if run:
        # Close the W&B run now (Lightning leaves it open): its files are complete, and a later run in the same
        # process (a resume) starts its own.
        for logger in wandb_loggers(cli.trainer):
            if logger._experiment is not None:
                logger.experiment.finish()
    return cli


def _folder_loggers(logger) -> list:
    """The ``init_args`` of the configured loggers that make a run folder (CSV, TensorBoard)."""
    entries = logger if isinstance(logger, list) else [logger]
    found = []
    for entry in entries:
        class_path = getattr(entry, "class_path", None) or (
            entry.get("class_path") if isinstance(entry, dict) else None
        )
        if class_path and class_path.rsplit(".", 1)[-1] in FOLDER_LOGGERS:
            found.append(entry.init_args)
    return found


def run_cli(main_function) -> None:
    """Run ``main_function()`` on the command line; an error prints one line, ``error: <message>``, and exits 1,
    unless ``--debug`` is among the arguments or ``FT_DEBUG=1``, which show the traceback."""
    debug = "--debug" in sys.argv or os.environ.get("FT_DEBUG", "") not in ("", "0")
    sys.argv = [a for a in sys.argv if a != "--debug"]
    if debug:
        main_function()
        return
    try:
        main_function()
    except Exception as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}  (--debug shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
