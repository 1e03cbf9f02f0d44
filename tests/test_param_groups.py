"""Named parameter groups: every parameter exactly once, no decay on biases and norms, layer-wise LR decay."""

from __future__ import annotations

import pytest
from torch import nn

from modules.backbones import build_backbone
from modules.classifier import ClassificationHead
from modules.param_groups import build_param_groups, layer_lrs


@pytest.fixture(scope="module")
def parts():
    backbone = build_backbone("resnet_tiny")
    return backbone, ClassificationHead(backbone.num_features, 3, hidden_dim=8)


def test_every_parameter_is_in_exactly_one_group(parts) -> None:
    backbone, head = parts
    groups = build_param_groups(backbone.module, backbone.layer_groups, head, 1e-3, 1e-4, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    everything = [id(p) for p in [*backbone.module.parameters(), *head.parameters()]]
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(everything)
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names))  # LearningRateMonitor needs unique names
    assert names[:2] == ["head", "head.no_wd"] and "backbone.layer4" in names and "backbone.stem.no_wd" in names


def test_no_weight_decay_on_biases_and_norms(parts) -> None:
    backbone, head = parts
    groups = build_param_groups(backbone.module, backbone.layer_groups, head, 1e-3, 1e-4, weight_decay=0.05)
    by_id = {id(p): g for g in groups for p in g["params"]}
    for module in backbone.module.modules():
        for name, param in module.named_parameters(recurse=False):
            norm = isinstance(module, nn.BatchNorm2d)
            assert by_id[id(param)]["weight_decay"] == (0.0 if norm or name == "bias" else 0.05), (module, name)
    assert by_id[id(backbone.module.layer1[0].bn1.weight)]["layer_group"] == "backbone.layer1"


def test_layer_wise_decay_from_the_top(parts) -> None:
    backbone, head = parts
    groups = build_param_groups(backbone.module, backbone.layer_groups, head, 1e-2, 1e-3, layer_decay=0.5)
    lr = {g["name"]: g["lr"] for g in groups}
    assert lr["head"] == lr["head.no_wd"] == 1e-2
    assert lr["backbone.layer4"] == pytest.approx(1e-3)
    assert lr["backbone.layer3"] == pytest.approx(5e-4)
    assert lr["backbone.layer1"] == pytest.approx(1.25e-4)
    assert lr["backbone.stem"] == pytest.approx(6.25e-5) == pytest.approx(lr["backbone.stem.no_wd"])
    assert layer_lrs(["a", "b"], 0.1) == {"a": 0.1, "b": 0.1}


@pytest.mark.parametrize(
    ("lr", "backbone_lr", "layer_decay", "message"),
    [
        (0.0, 1e-3, None, "model.lr must be > 0, got 0.0"),
        (1e-3, -1e-4, None, "model.backbone_lr must be > 0"),
        (1e-3, 1e-4, 1.5, "model.layer_decay must be in"),
    ],
)
def test_bad_learning_rates_are_errors(parts, lr, backbone_lr, layer_decay, message) -> None:
    backbone, head = parts
    with pytest.raises(ValueError, match=message):
        build_param_groups(backbone.module, backbone.layer_groups, head, lr, backbone_lr, layer_decay)


def test_classifier_uses_the_backbone_ratio() -> None:
    from modules.image_classifier import ImageClassifier

    model = ImageClassifier("resnet_tiny", num_classes=2, pretrained=False, lr=1e-3, backbone_lr_ratio=0.1)
    lrs = {g["name"]: g["lr"] for g in model.configure_optimizers().param_groups}
    assert lrs["head"] == 1e-3 and lrs["backbone.layer2"] == pytest.approx(1e-4)
    assert isinstance(model.head, nn.Sequential)
