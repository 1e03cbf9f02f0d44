"""A saved run's model, rebuilt from its checkpoint and the ``config.yaml`` the run wrote beside it (which names the
model's class): what eval, predict and export load (``scripts/from_run.py``), and what a distillation teacher is
(``modules/distillation.py``).

A run directory looks like ``runs/<experiment>/version_<n>/`` with ``config.yaml`` and ``checkpoints/*.ckpt``;
the config is found by walking up from the checkpoint (or given explicitly).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from lightning import LightningModule


def import_class(path: str) -> type:
    """The class named by a dotted ``class_path`` (``modules.image_classifier.ImageClassifier``)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def find_config(ckpt: Path) -> Path:
    """The ``config.yaml`` of the run that wrote ``ckpt``: in its folder or one of the two above it."""
    for folder in list(ckpt.resolve().parents)[:3]:
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise FileNotFoundError(f"no config.yaml beside {ckpt} or in the two folders above it: give --config")


def load_model(ckpt: str | Path, config: str | Path | None = None) -> tuple[LightningModule, dict, Path]:
    """The model of ``ckpt`` (on CPU, in eval mode), the run's config as a dict, and the config file's path.

    Args:
        ckpt: a Lightning checkpoint written by ``scripts/train.py``.
        config: the run's ``config.yaml``; None finds it beside the checkpoint.
    """
    ckpt_path = Path(ckpt)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist")
    config_path = Path(config) if config else find_config(ckpt_path)
    settings = yaml.safe_load(config_path.read_text())
    model_class = import_class(settings["model"]["class_path"])
    # Checkpoints hold tensors and plain hyperparameters only: no pickled code is run when reading them.
    try:
        model = model_class.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a checkpoint, or not this model's
        reason = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"checkpoint {ckpt_path} cannot be loaded ({type(err).__name__}: {reason})") from err
    model.eval()
    return model, settings, config_path
