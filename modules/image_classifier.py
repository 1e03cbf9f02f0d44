"""Image classification: a registry backbone + a dropout/linear head, trained with cross-entropy.

Inputs are images scaled to [0, 1]; the module applies its backbone's normalization itself, so data modules never
need to know which backbone they feed, and an exported or reloaded model cannot be fed with the wrong statistics.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
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
        backbone: registry name of the backbone (``modules.backbones.list_backbones()``), or ``timm:<name>``.
        pretrained: start from the backbone's pretrained weights (False: random initialisation).
        backbone_checkpoint: backbone weights to start from instead: a backbone exported by pre-training (its
            folder), a safetensors file, a Lightning checkpoint, or a W&B artifact ``wandb:entity/project/name:alias``
            (``modules/handoff.py``). Only the head may be left without weights; other key differences are errors.
        predict_image_size: the side of the images the data module feeds (``scripts/train.py`` links it from
            ``data.image_size``; another name than the data's, since Lightning refuses two equal hyperparameter
            names with different values): what predict and export feed the model.
        dropout: dropout probability in the head.
        channels_last: keep convolution weights and inputs in channels-last memory format (measured here: a
            training step of EfficientNet-Lite0 at 64 px on 2 CPU cores takes 0.70 s instead of 1.03 s).
        kwargs: the classes and head of :class:`~modules.classifier.Classifier`, the learning rates and optimizer
            of :class:`~modules.finetune.FineTuneModule`.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        pretrained: bool = True,
        backbone_checkpoint: str | None = None,
        predict_image_size: int | None = None,
        dropout: float = 0.2,
        channels_last: bool = True,
        **kwargs,
    ):
        super().__init__(dropout=dropout, **kwargs)
        spec = build_backbone(backbone, pretrained=pretrained and not backbone_checkpoint)
        size = predict_image_size
        if spec.input_size and size and size != spec.input_size:
            raise ValueError(f"backbone {backbone} takes {spec.input_size} px images but data.image_size is {size}")
        self.backbone = spec.module
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.backbone.to(memory_format=self.memory_format)
        self.layer_groups = spec.layer_groups
        self.input_size = spec.input_size
        self.normalize = Normalize(spec.mean, spec.std)
        self.build_head(spec.num_features)
        if backbone_checkpoint:
            load_backbone(self, backbone_checkpoint, name=backbone)
        self.apply_adapters()  # LoRA (model.lora), on the backbone's final weights

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

    @property
    def image_side(self) -> int:
        """The side of the images predict and export feed: the data's (``image_size``) or the backbone's."""
        side = self.hparams.get("predict_image_size") or self.input_size
        if not side:
            raise ValueError(
                "the model does not know its image size: model.predict_image_size is unset (linked from "
                "data.image_size; with a data module whose argument has another name, give "
                "--model.init_args.predict_image_size)"
            )
        return int(side)

    def predict_path(self, source: Path, datamodule) -> list[dict]:
        """Classify an image file, or every image in a folder (recursively), through the data module's evaluation
        pipeline (``image_transform()``; else a resize to :attr:`image_side`)."""
        from datamodules.image_folder import IMAGE_EXTENSIONS, load_rgb
        from datamodules.transforms import eval_transform

        files = (
            [source]
            if source.is_file()
            else sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        )
        if not files:
            raise ValueError(f"{source} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        transform = (
            datamodule.image_transform() if hasattr(datamodule, "image_transform") else eval_transform(self.image_side)
        )
        rows = self.predict_images([str(p) for p in files], lambda path: transform(load_rgb(path)))
        if not rows:
            raise ValueError(f"none of the {len(files)} image(s) in {source} could be decoded")
        return rows

    def export_meta(self) -> dict:
        side = self.image_side
        return {
            "input": {"shape": ["batch", 3, side, side], "range": [0, 1], "layout": "NCHW"},
            "output": "logits",
            "mean": self.normalize.mean.flatten().tolist(),
            "std": self.normalize.std.flatten().tolist(),
        }

    def example_input(self) -> torch.Tensor:
        return torch.rand(2, 3, self.image_side, self.image_side)
