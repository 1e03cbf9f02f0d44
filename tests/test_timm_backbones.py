"""timm models as backbones (``timm:<name>``): the registry contract, timm's grouping, normalization and input size,
the offline errors, and training through ImageClassifier with a freezing strategy."""

from __future__ import annotations

import pytest
import torch
from lightning import Trainer
from torch import nn

from callbacks.unfreezing import GradualUnfreezing
from datamodules.image_folder import ImageFolderDataModule
from modules.backbone_spec import IMAGENET_MEAN
from modules.backbones import build_backbone, split_by_group
from modules.image_classifier import ImageClassifier

timm = pytest.importorskip("timm")


def _first_use_order(module: nn.Module, layer_groups: dict[str, tuple[str, ...]], size: int) -> list[str]:
    """Layer groups in the order a forward pass first runs a layer of theirs."""
    order: list[str] = []

    def hook(name: str):
        def record(*_) -> None:
            group = next(g for g, prefixes in layer_groups.items() if any(f"{name}.".startswith(p) for p in prefixes))
            if group not in order:
                order.append(group)

        return record

    handles = [
        m.register_forward_pre_hook(hook(name))
        for name, m in module.named_modules()
        if name and any(True for _ in m.parameters(recurse=False))
    ]
    with torch.no_grad():
        module.eval()(torch.rand(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return order


# resnet18 and efficientnet_b0: the examples; mobilenetv3: features from its conv_head (head_hidden_size, not
# num_features); poolformer: no timm coarse grouping (MetaFormer), grouped by its stages; test_vit: a tiny ViT.
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenetv3_small_050", "poolformer_s12", "test_vit"])
def test_timm_backbone_contract(name: str) -> None:
    backbone = build_backbone(f"timm:{name}", pretrained=False)
    size = backbone.input_size or 64
    with torch.no_grad():
        features = backbone.module.eval()(torch.rand(2, 3, size, size))
    assert features.shape == (2, backbone.num_features)

    groups = split_by_group(backbone.module, backbone.layer_groups)  # raises on a parameter in 0 or 2 groups
    assert all(groups.values()), f"empty layer groups: {[g for g, p in groups.items() if not p]}"
    assert sum(len(p) for p in groups.values()) == len(list(backbone.module.parameters()))
    names = list(backbone.layer_groups)
    assert names == ["stem", *(f"stage{i}" for i in range(1, len(names)))]
    assert _first_use_order(backbone.module, backbone.layer_groups, size) == names  # shallow to deep


def test_resnet18_groups_follow_its_stages() -> None:
    backbone = build_backbone("timm:resnet18", pretrained=False)
    assert backbone.layer_groups == {
        "stem": ("conv1.", "bn1."),
        **{f"stage{i}": (f"layer{i}.",) for i in range(1, 5)},
    }
    assert backbone.num_features == 512 and backbone.input_size is None


def test_vit_has_a_fixed_input_size_and_its_own_normalization() -> None:
    backbone = build_backbone("timm:vit_tiny_patch16_224", pretrained=False)
    config = timm.data.resolve_data_config({}, model=backbone.module)
    assert backbone.input_size == 224 == config["input_size"][-1]
    assert backbone.mean == tuple(config["mean"]) == (0.5, 0.5, 0.5) != IMAGENET_MEAN
    assert backbone.std == tuple(config["std"])
    groups = backbone.layer_groups
    assert {"cls_token", "pos_embed", "patch_embed."} <= set(groups["stem"])
    assert len(groups) == 13 and "norm." in groups["stage12"]  # 12 blocks; the final norm with the last one


def test_cnn_normalization_comes_from_timm_and_any_size_works() -> None:
    backbone = build_backbone("timm:test_convnext", pretrained=False)
    config = timm.data.resolve_data_config({}, model=backbone.module)
    assert backbone.mean == tuple(config["mean"]) != IMAGENET_MEAN
    assert backbone.input_size is None
    with torch.no_grad():
        assert backbone.module.eval()(torch.rand(1, 3, 40, 40)).shape == (1, backbone.num_features)


def test_pretrained_weights_offline_fail_with_one_line_naming_what_works(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nCheck your connection.")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_network)
    with pytest.raises(RuntimeError, match=r"backbone 'timm:resnet18' could not load its pretrained weights") as e:
        build_backbone("timm:resnet18", pretrained=True)
    message = str(e.value)
    assert "\n" not in message
    assert "efficientnet_lite0" in message and "resnet_tiny" in message and "convnext_tiny" not in message
    assert "--model.init_args.pretrained false" in message


def test_unknown_timm_model_suggests_a_list_models_pattern() -> None:
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet19x'.*timm\.list_models\('\*resnet19x\*'\)"):
        build_backbone("timm:resnet19x", pretrained=False)


def test_timm_backbone_loads_a_local_checkpoint(tmp_path) -> None:
    source = build_backbone("timm:test_resnet", pretrained=False)
    torch.save(source.module.state_dict(), tmp_path / "backbone.pt")
    loaded = build_backbone("timm:test_resnet", checkpoint=str(tmp_path / "backbone.pt"))  # pretrained: not fetched
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.module.eval()(x), source.module.eval()(x))


def test_image_classifier_trains_a_timm_backbone_group_by_group(tmp_path, split_image_folder) -> None:
    model = ImageClassifier("timm:resnet18", pretrained=False, num_classes=3, class_names=["blue", "green", "red"])
    stem_before = model.backbone.conv1.weight.detach().clone()
    stem_stats = model.backbone.bn1.running_mean.clone()
    deepest_before = model.backbone.layer4[1].conv2.weight.detach().clone()
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[GradualUnfreezing(start_epoch=0, groups_per_epoch=1)],  # epoch 0: the head and stage4 train
    )
    trainer.fit(model, ImageFolderDataModule(str(split_image_folder), image_size=32, batch_size=4, num_workers=0))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(model.backbone.layer4[1].conv2.weight, deepest_before)
    assert torch.equal(model.backbone.conv1.weight, stem_before)
    assert torch.equal(model.backbone.bn1.running_mean, stem_stats)  # frozen group keeps its BatchNorm statistics
