"""The task protocol: what every fine-tuning module shares, and the hooks the scripts call instead of asking which
task a model is.

A task (``ImageClassifier``, ``TextClassifier``, ``ExtractiveQA``, ``MaskedLM``, or yours) subclasses
:class:`FineTuneModule`, takes its own arguments plus ``**kwargs`` and passes ``**kwargs`` on: the learning-rate and
optimizer arguments below are declared and documented here once, and LightningCLI still shows them in each task's
``--help`` (jsonargparse follows ``**kwargs`` into this constructor). A task sets ``backbone`` (a module whose
parameters ``layer_groups`` cover exactly once, shallow to deep) and ``head``, and implements ``forward`` and the
Lightning steps. The optional hooks:

* :meth:`predict_path`: predictions for a file or folder of new inputs (``scripts/predict.py``);
* :meth:`export_meta` and :meth:`example_input`: what ``scripts/export.py`` writes beside the weights, and an input
  for the graph exports (ONNX, TorchScript) where the task has a tensor input;
* :meth:`test_artifacts`: files the run keeps after ``test`` (written by ``callbacks.tracking.RunReport``, so a
  module never needs to know where the run's folder is).

What a task needs from its data (number of classes, class names, the tokenizer, the image size) is linked in
``scripts/train.py`` with LightningCLI's ``link_arguments``, so a model gets it as a constructor argument.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import LightningModule
from lightning.pytorch.cli import OptimizerCallable

from modules.param_groups import build_param_groups


class FineTuneModule(LightningModule):
    """Base class of every task: the engine's named parameter groups and their learning rates.

    Args:
        lr: peak learning rate of the head.
        backbone_lr: peak learning rate of the backbone (of its deepest group with ``layer_decay``); None uses
            ``lr * backbone_lr_ratio``.
        backbone_lr_ratio: backbone LR as a fraction of the head's when ``backbone_lr`` is None (the classic
            recipe: 0.1).
        layer_decay: layer-wise LR decay: each backbone group gets the LR of the group above it times this.
        weight_decay: weight decay of weight matrices and kernels (biases and norm parameters get none).
        optimizer: optimizer class (``class_path`` in YAML); it receives the named parameter groups.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        backbone_lr: float | None = None,
        backbone_lr_ratio: float = 0.1,
        layer_decay: float | None = None,
        weight_decay: float = 0.01,
        optimizer: OptimizerCallable = torch.optim.AdamW,
    ):
        super().__init__()
        # Collects the arguments of every constructor in the chain (the task's and these), whatever their defaults.
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer = optimizer

    def configure_optimizers(self):
        hp = self.hparams
        backbone_lr = hp.backbone_lr if hp.backbone_lr is not None else hp.lr * hp.backbone_lr_ratio
        groups = build_param_groups(
            self.backbone, self.layer_groups, self.head, hp.lr, backbone_lr, hp.layer_decay, hp.weight_decay
        )
        return self.optimizer(groups)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The weights are in the state dict: rebuilding from this checkpoint must not download or read them again.
        checkpoint["hyper_parameters"] |= {"pretrained": False, "backbone_checkpoint": None}

    # --- hooks of the task protocol -------------------------------------------------------------------------------

    def predict_path(self, source: Path, datamodule) -> list[dict]:
        """Predictions for the new inputs at ``source`` (a file, or a folder where the task reads folders), one dict
        per input; ``datamodule`` is the run's data module, rebuilt from its config (for its evaluation
        preprocessing)."""
        raise ValueError(f"{type(self).__name__} does not predict on files (no predict_path)")

    def export_meta(self) -> dict:
        """What a serving process needs beside the weights (input shape and normalisation, tokenizer, ...)."""
        return {}

    def example_input(self) -> torch.Tensor | None:
        """An input batch for the graph exports (ONNX, TorchScript); None when the task's input is not one tensor."""
        return None

    def test_artifacts(self) -> dict[str, str]:
        """``{file name: text}`` the run keeps after ``test`` (predictions, a confusion matrix)."""
        return {}
