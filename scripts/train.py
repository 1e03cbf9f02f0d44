"""Train, validate, test and predict from a YAML experiment: a LightningCLI.

    python scripts/train.py fit --config configs/digits.yaml [--trainer.max_epochs=2 ...]
    python scripts/train.py test --config configs/digits.yaml --ckpt_path runs/digits/version_0/checkpoints/last.ckpt
    python scripts/train.py fit --config configs/digits.yaml --print_config

Any LightningModule and LightningDataModule can be named with ``class_path`` in the config. The resolved config is
saved as ``config.yaml`` in the run directory, beside its ``checkpoints/``. After ``fit`` the best checkpoint is
tested (``--test_after_fit=false`` to skip) and a short summary is printed.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
import yaml
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.tracking import RunReport, git_commit, wandb_loggers

# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per run: noise, not a user's concern.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class SaveConfig(SaveConfigCallback):
    """Writes ``config.yaml`` to the run directory (Lightning's), and logs the resolved config and the git commit to
    every W&B logger."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        commit = git_commit()
        if trainer.log_dir and commit:
            (Path(trainer.log_dir) / "git_commit.txt").write_text(commit + "\n")
        loggers = wandb_loggers(trainer)
        if loggers:
            resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in loggers:
                logger.experiment.config.update({"config": resolved, "git_commit": commit}, allow_val_change=True)


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True, help="Test the best checkpoint after fit.")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, RunReport) for c in trainer.callbacks):
            trainer.callbacks.append(RunReport())  # plots, samples, group table: every run
        return trainer

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()
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
        if trainer.is_global_zero:
            _print_summary(trainer, checkpoint, best, results, wall, tested_weights)


def _print_summary(trainer, checkpoint, best: str, results: dict, wall: float, tested: str) -> None:
    lines = [f"fit wall time: {wall:.1f} s ({trainer.current_epoch} epochs)"]
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_score is not None:
        lines.append(f"best {checkpoint.monitor}: {checkpoint.best_model_score.item():.4f}")
    if results:
        lines.append(f"tested weights: {'the last ones' if tested == 'last' else 'the best checkpoint'}")
    lines += [f"{key}: {value:.4f}" for key, value in sorted(results.items())]
    if best:
        lines.append(f"best checkpoint: {best}")
    if trainer.log_dir:
        lines.append(f"run directory: {trainer.log_dir}")
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


if __name__ == "__main__":
    main()
