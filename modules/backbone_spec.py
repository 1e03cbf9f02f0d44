"""One description of a backbone for every task: image backbones (the registry, timm) and text encoders."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """A feature extractor and what the rest of the template needs to know about it: one type for image backbones
    and text encoders (``modules.text_encoder``).

    Args:
        module: the feature extractor: images, a normalized batch ``(B, 3, H, W)`` -> ``(B, num_features)``; text,
            a transformers model returning hidden states of width ``num_features``.
        num_features: width of the features; heads take their input width from it.
        layer_groups: group name -> parameter-name prefixes inside ``module``, ordered shallow to deep.
        mean: images: per-channel mean of the input normalization (inputs in [0, 1]).
        std: images: per-channel std of the input normalization.
        input_size: images: the one input size the module accepts (ViT position embeddings), or None for any size.
        tokenizer_path: text: where ``AutoTokenizer.from_pretrained`` finds the encoder's tokenizer.
    """

    module: nn.Module
    num_features: int
    layer_groups: dict[str, tuple[str, ...]]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int | None = None
    tokenizer_path: str | None = None
