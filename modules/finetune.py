"""The part every fine-tuning module shares: a ``backbone`` with named ``layer_groups``, a ``head``, and the
optimizer built from the engine's named parameter groups.

Subclasses set ``backbone``, ``layer_groups``, ``head`` and ``optimizer`` (an ``OptimizerCallable``) and save the
hyperparameters ``lr``, ``backbone_lr``, ``backbone_lr_ratio``, ``layer_decay`` and ``weight_decay``.
"""

from __future__ import annotations

from lightning import LightningModule

from modules.param_groups import build_param_groups


class FineTuneModule(LightningModule):
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
