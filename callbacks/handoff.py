"""Export the pre-trained backbone at the end of ``fit``: the hand-off to fine-tuning (``modules/handoff.py``)."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.tracking import git_commit, wandb_loggers
from modules.handoff import export_backbone


class ExportBackbone(Callback):
    """After ``fit``, write the backbone of the best checkpoint (the last weights when there is none) to
    ``<run directory>/<folder>``, and log it to W&B as an artifact of type ``backbone``.

    Fine-tuning then takes it with ``--model.backbone_checkpoint <run directory>/backbone`` (or, online, the artifact
    reference ``wandb:<entity>/<project>/backbone-<run name>:latest``). ``scripts/export_backbone.py`` does the same
    for any checkpoint.

    Args:
        folder: sub-folder of the run directory to write to.
        artifact: log the folder to every W&B logger as an artifact (uploaded when online; by ``make sync``
            when the run was recorded offline).
    """

    def __init__(self, folder: str = "backbone", artifact: bool = True):
        self.folder = folder
        self.artifact = artifact
        self.path: Path | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.interrupted:
            return
        log_dir = trainer.log_dir  # on every rank: under DDP it is a broadcast, which rank 0 alone would wait on
        if not trainer.is_global_zero:
            return
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"] if best else None
        root = Path(log_dir or trainer.default_root_dir)
        self.path = export_backbone(
            pl_module, root / self.folder, state=state, source=best or "final weights", git_commit=git_commit()
        )
        print(f"backbone exported to {self.path} (fine-tune with --model.backbone_checkpoint {self.path})")
        if self.artifact:
            import wandb

            for logger in wandb_loggers(trainer):
                name = f"backbone-{logger.experiment.name}".replace("/", "-")
                artifact = wandb.Artifact(name, type="backbone", metadata={"source": best or "final weights"})
                artifact.add_dir(str(self.path))
                logger.experiment.log_artifact(artifact)
