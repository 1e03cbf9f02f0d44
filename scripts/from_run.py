"""Rebuild a run's model and data module from a checkpoint and the ``config.yaml`` saved beside it, so that eval,
predict and export need no flags of the original experiment.

A run directory looks like ``runs/<experiment>/version_<n>/`` with ``config.yaml`` and ``checkpoints/*.ckpt``;
the config is found by walking up from the checkpoint (or given with ``--config``). Loading the model is
``modules.saved_run.load_model`` (a distillation teacher is loaded the same way).
"""

from __future__ import annotations

from pathlib import Path

from lightning import LightningDataModule, LightningModule

from modules.saved_run import find_config, import_class, load_model

__all__ = ["build_datamodule", "find_config", "import_class", "load_run"]


def load_run(ckpt: str, config: str | None = None) -> tuple[LightningModule, dict, Path]:
    """The model of ``ckpt`` (on CPU, in eval mode), the run's config and the run directory."""
    model, settings, config_path = load_model(ckpt, config)
    return model, settings, config_path.parent


def build_datamodule(settings: dict, **overrides) -> LightningDataModule:
    """The run's data module, from its saved config, with ``overrides`` of its arguments."""
    data = settings["data"]
    return import_class(data["class_path"])(**(data.get("init_args", {}) | overrides))
