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

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per run: noise, not a user's concern.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True, help="Test the best checkpoint after fit.")

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.interrupted:
            return
        wall = time.perf_counter() - self._fit_started
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
        results = {}
        if self.config_init[self.subcommand].get("test_after_fit", True):
            tested = trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False)
            results = tested[0] if tested else {}
        if trainer.is_global_zero:
            _print_summary(trainer, checkpoint, best, results, wall)


def _print_summary(trainer, checkpoint, best: str, results: dict, wall: float) -> None:
    lines = [f"fit wall time: {wall:.1f} s ({trainer.current_epoch} epochs)"]
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_score is not None:
        lines.append(f"best {checkpoint.monitor}: {checkpoint.best_model_score.item():.4f}")
    lines += [f"{key}: {value:.4f}" for key, value in sorted(results.items())]
    if best:
        lines.append(f"best checkpoint: {best}")
    if trainer.log_dir:
        lines.append(f"run directory: {trainer.log_dir}")
    print("\n".join(["", "=== summary ===", *lines]), flush=True)


def main(args: list[str] | None = None, run: bool = True) -> TrainCLI:
    """Run the CLI on ``args`` (default: the command line); ``run=False`` only builds the objects (no subcommand)."""
    return TrainCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
