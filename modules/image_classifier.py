"""Image classification: a registry backbone + a dropout/linear head, trained with cross-entropy.

Inputs are images scaled to [0, 1]; the module applies its backbone's normalization itself, so data modules never
need to know which backbone they feed, and an exported or reloaded model cannot be fed with the wrong statistics.
"""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from modules.backbones import build_backbone
from modules.classifier import Classifier
from modules.handoff import load_backbone


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on a ``(B, 3, H, W)`` batch in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        # Not persistent: they follow from the backbone's name, so checkpoints stay plain backbone + head weights.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(Classifier):
    """Fine-tune (or train from scratch) a registry backbone for single-label image classification.

    Args:
        backbone: registry name of the backbone (``modules.backbones.list_backbones()``).
        num_classes: number of classes; None takes it from the data module. Given and different from the data's,
            training stops with an error.
        class_names: class names in label order; None takes them from the data module. Saved with the checkpoint.
        pretrained: start from the backbone's pretrained weights (False: random initialisation).
        backbone_checkpoint: backbone weights to start from instead: a backbone exported by pre-training (its
            folder), a safetensors file, a Lightning checkpoint, or a W&B artifact ``wandb:entity/project/name:alias``
            (``modules/handoff.py``). Only the head may be left without weights; other key differences are errors.
        hidden_dim: width of an optional hidden layer in the head.
        dropout: dropout probability in the head.
        label_smoothing: label smoothing of the cross-entropy loss.
        lr: peak learning rate of the head.
        backbone_lr: peak learning rate of the backbone (of its deepest group with ``layer_decay``); None uses
            ``lr * backbone_lr_ratio``.
        backbone_lr_ratio: backbone LR as a fraction of the head's when ``backbone_lr`` is None (the classic
            recipe: 0.1).
        layer_decay: layer-wise LR decay: each backbone group gets the LR of the group above it times this.
        weight_decay: weight decay of weight matrices and kernels (biases and norm parameters get none).
        optimizer: optimizer class (``class_path`` in YAML); it receives the named parameter groups.
        channels_last: keep convolution weights and inputs in channels-last memory format (measured here: a
            training step of EfficientNet-Lite0 at 64 px on 2 CPU cores takes 0.70 s instead of 1.03 s).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        pretrained: bool = True,
        backbone_checkpoint: str | None = None,
        hidden_dim: int | None = None,
        dropout: float = 0.2,
        label_smoothing: float = 0.0,
        lr: float = 1e-3,
        backbone_lr: float | None = None,
        backbone_lr_ratio: float = 0.1,
        layer_decay: float | None = None,
        weight_decay: float = 0.01,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        channels_last: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        spec = build_backbone(backbone, pretrained=pretrained and not backbone_checkpoint)
        self.backbone = spec.module
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.backbone.to(memory_format=self.memory_format)
        self.layer_groups = spec.layer_groups
        self.num_features = spec.num_features
        self.input_size = spec.input_size
        self.normalize = Normalize(spec.mean, spec.std)
        self.optimizer = optimizer
        self.init_classes(num_classes, class_names)
        if backbone_checkpoint:
            load_backbone(self, backbone_checkpoint, name=backbone)

    def adopt_data(self, datamodule) -> None:
        image_size = getattr(datamodule, "hparams", {}).get("image_size")
        if self.input_size and image_size and image_size != self.input_size:
            name, size = self.hparams.backbone, self.input_size
            raise ValueError(f"backbone {name} takes {size} px images but data.image_size is {image_size}")
        super().adopt_data(datamodule)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1], ``(B, 3, H, W)``, to logits ``(B, num_classes)``."""
        return self.head(self.features(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features ``(B, num_features)`` that the head classifies."""
        return self.backbone(self.normalize(images).contiguous(memory_format=self.memory_format))

    @torch.no_grad()
    def predict_images(self, paths: list[str], load, batch_size: int = 64) -> list[dict]:
        """Classify image files: ``[{"input": path, "label": name, "score": p, "probs": {name: p, ...}}, ...]``.

        Args:
            paths: the image files; one that cannot be decoded is skipped with a warning that names it.
            load: path -> (3, H, W) tensor in [0, 1]: the file read and put through the data module's evaluation
                pipeline (``datamodules.image_folder.load_rgb`` then ``image_transform()``); normalization is in
                the model.
            batch_size: images per forward pass.
        """
        was_training = self.training
        self.eval()
        results, skipped = [], []
        for start in range(0, len(paths), batch_size):
            images, kept = [], []
            for path in paths[start : start + batch_size]:
                try:
                    images.append(load(path))
                    kept.append(path)
                except Exception as err:  # PIL raises several unrelated types for bad files
                    skipped.append(f"{path} ({err})")
            if images:
                logits = self(torch.stack(images).to(self.device))
                results += [{"input": p} | r for p, r in zip(kept, self.label_results(logits.softmax(-1)), strict=True)]
        self.train(was_training)
        if skipped:
            shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            warnings.warn(f"skipped {len(skipped)} image(s) that cannot be decoded: {shown}", stacklevel=2)
        return results
