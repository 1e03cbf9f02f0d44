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
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml
from jsonargparse import Namespace
from lightning import LightningDataModule, LightningModule
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, RichModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.reliability import AtomicCheckpointIO, Checkpoint, EpochSeed, FiniteGuard, RunError
from callbacks.requeue import Requeue, requeue_flag
from callbacks.tracking import RichSummary, RunReport, fold_wandb_loggers, git_commit, run_dir, wandb_loggers
from scripts.cluster import check_layout, launcher
from scripts.experiments import BASE_CONFIG, name_runs, order_callbacks
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
# The template's data modules do resume mid-epoch (datamodules.loaders.batches_done): Lightning cannot know it.
warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
# Lightning 2.6 advertises litlogger at every Trainer: that one record is dropped, Lightning's other messages stay.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip: For seamless cloud logging")
)


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


# What a model needs from its data, stated once. A link whose source or target the chosen classes lack is skipped
# (an image model has no encoder; a QA model no classes), so one list serves every task. The classes are read from
# the data module object (``num_classes``, ``class_names``, available before ``setup``); the rest are arguments.
DATA_LINKS = (
    ("data", "model.init_args.num_classes", "num_classes"),
    ("data", "model.init_args.class_names", "class_names"),
)
ARGUMENT_LINKS = (
    ("model.init_args.encoder", "data.init_args.tokenizer"),  # the data tokenizes for the model's encoder
    ("data.init_args.image_size", "model.init_args.predict_image_size"),  # what predict and export feed
    ("data.init_args.max_length", "model.init_args.predict_max_length"),  # raw texts are cut as in training
    ("data.init_args.doc_stride", "model.init_args.predict_doc_stride"),
    ("data.init_args.max_query_length", "model.init_args.predict_max_query_length"),
)


def _data_attribute(name: str):
    def read(datamodule):
        return getattr(datamodule, name, None)  # None: the data module does not provide it; the model's own stands

    return read


def link_data_to_model(parser: LightningArgumentParser) -> None:
    """Declare the links between the data module and the model (see ``DATA_LINKS`` and ``ARGUMENT_LINKS``)."""
    for source, target, attribute in DATA_LINKS:
        parser.link_arguments(source, target, compute_fn=_data_attribute(attribute), apply_on="instantiate")
    for source, target in ARGUMENT_LINKS:
        parser.link_arguments(source, target)


def base_config_kwargs(run: bool) -> dict:
    """``parser_kwargs`` that load ``configs/base.yaml`` (the trainer settings, loggers and callbacks every experiment
    shares) before any ``--config``: an experiment YAML holds only what differs. Per subcommand (``fit``, ``test``
    ...), or for the one parser of ``run=False``."""
    kwargs = {"default_config_files": [str(BASE_CONFIG)]}
    return {subcommand: dict(kwargs) for subcommand in LightningCLI.subcommands()} if run else kwargs


def add_experiment_arguments(parser: LightningArgumentParser) -> None:
    parser.add_argument(
        "--name",
        type=str | None,
        default=None,
        help="The experiment's name, given once: the runs go to <save_dir>/<name>/version_N and to W&B as run name, "
        "group and tag, unless a logger names its own (default: the first --config file's name, digits for "
        "configs/digits.yaml).",
    )
    parser.add_argument("--tags", type=list[str] | None, default=None, help="W&B tags of the runs (default: [name]).")


def resolve_experiment(config) -> None:
    """Name the runs from ``name`` (default: the first ``--config`` file's name) and put the LR monitor and progress
    bar after the other callbacks (``scripts/experiments.py``: ``name_runs``, ``order_callbacks``). In place, on the
    parsed config, with or without its subcommand level."""
    if not isinstance(config, Namespace):
        return
    subcommand = config.get("subcommand")
    if subcommand and isinstance(config.get(subcommand), Namespace):
        config = config[subcommand]
    if not isinstance(config.get("trainer"), Namespace):
        return
    files = [Path(os.fspath(path)) for path in config.get("config") or [] if path is not None]
    name_runs(config, files[0].stem if files else None)
    order_callbacks(config)


class ExperimentParser(LightningArgumentParser):
    """The CLI's parser: what it prints (``--print_config``) and saves is the experiment as it runs, its runs named and
    its callbacks in order (:func:`resolve_experiment`)."""

    def dump(self, cfg, *args, **kwargs):
        if isinstance(cfg, Namespace):
            cfg = cfg.clone()
            resolve_experiment(cfg)
        return super().dump(cfg, *args, **kwargs)


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True, help="Test the best checkpoint after fit.")
        add_experiment_arguments(parser)
        parser.add_argument(
            "--run",
            type=str | None,
            default=None,
            help="Continue the run in this folder (runs/<exp>/version_N): from its checkpoints/last.ckpt unless "
            "--ckpt_path is given, in the same folder, metrics.csv and W&B run.",
        )
        parser.add_argument(
            "--run_folder",
            type=str | None,
            default=None,
            help="This run's folder, the same on every node: resumes from its checkpoints/last.ckpt when it has one, "
            "else starts a new run there (what a requeued SLURM job or a restarted torchrun passes; "
            "scripts/launch.py names it from the job id).",
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
        link_data_to_model(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        resolve_experiment(self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._kept_metrics = None
        fold_wandb_loggers(config.trainer.get("logger"))  # a preset's W&B logger configures the experiment's
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
        folder = config.get("run_folder")
        if folder is not None:
            if run is not None:
                raise RunError("--run and --run_folder name the run twice: give one")
            folder = Path(folder)
            if ckpt is None and not (folder / "checkpoints" / "last.ckpt").is_file():
                folder.mkdir(parents=True, exist_ok=True)
                return folder.resolve()  # a new run in this folder
            run = folder
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
            if type(callback) is RichModelSummary:  # Lightning's default, without "Total FLOPs: 0"
                callback.__class__ = RichSummary
        for kind in (RunReport, EpochSeed, FiniteGuard):  # plots, exact resume, NaN guard: every run
            if not any(isinstance(c, kind) for c in trainer.callbacks):
                trainer.callbacks.append(kind())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        check_layout(trainer)  # torchrun/SLURM process layout vs devices x num_nodes: one line, before any hang
        if launcher(os.environ) == "slurm" and self.subcommand == "fit":
            environment = getattr(trainer.strategy, "cluster_environment", None)
            if hasattr(environment, "auto_requeue"):
                environment.auto_requeue = False  # ours requeues (callbacks/requeue.py says why)
            if not any(isinstance(c, Requeue) for c in trainer.callbacks):
                trainer.callbacks.append(Requeue())
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
        if requeue_flag(trainer):  # the job continues in its requeued self, from last.ckpt
            self.results = {"requeued": True}
            rank_zero_info("requeued before the time limit: not tested; the requeued job resumes from last.ckpt")
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
            if any(getattr(c, "tests_last_weights", False) for c in trainer.callbacks):
                tested_weights = "last"  # e.g. pruning: the final sparse weights are the result, not the best epoch
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
            _finish_wandb(trainer)  # what W&B prints as its run ends comes before the summary, the last thing shown
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
        parser_class=ExperimentParser,
        parser_kwargs=base_config_kwargs(run),
        args=args,
        run=run,
    )
    if run:
        # Close the W&B run now (Lightning leaves it open): its files are complete, and a later run in the same
        # process (a resume) starts its own.
        _finish_wandb(cli.trainer)
    return cli


def _finish_wandb(trainer) -> None:
    for logger in wandb_loggers(trainer):
        if logger._experiment is not None:
            logger.experiment.finish()  # a no-op when the run has already finished


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
        while "Call to compute_fn of link" in str(err) and err.__cause__ is not None:
            err = err.__cause__  # jsonargparse wraps what a data module raised while the links were read
        message = " ".join(str(err).split()) or type(err).__name__
        # jsonargparse reports a model or data class that raised while being built as a failed match of every
        # subtype ("Errors: - <ours> - Expected a <class 'NoneType'> ..."): keep our message.
        union = re.search(r"Union subtypes .*?Errors: - (.*?) - Expected a <class 'NoneType'>", message)
        message = union.group(1) if union else message
        print(f"error: {message}  (--debug shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
