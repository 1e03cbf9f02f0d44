"""LoRA (``model.lora``): the base weights stay bit-identical while adapters and head train; adapter checkpoints are
small and load only onto their base weights; resume is exact; DDP needs no unused-parameter search; the export merges
the adapters and keeps the outputs; ``make plan`` shows the adapter parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file

from callbacks.lr_schedule import LRSchedule
from callbacks.unfreezing import FreezeUnfreeze, NoFreeze
from modules.image_classifier import ImageClassifier
from tests.conftest import REPO, Blobs
from tests.test_unfreezing import SaveRankState

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["conv1", "conv2"]}


def _model(tmp_path: Path, backbone_file: Path | None = None, **kwargs) -> ImageClassifier:
    """resnet_tiny on fixed base weights (a backbone file, as a pretrained backbone would be), with LoRA."""
    if backbone_file is None:
        backbone_file = tmp_path / "base.safetensors"
        if not backbone_file.exists():
            torch.manual_seed(0)
            base = ImageClassifier("resnet_tiny", num_classes=3, pretrained=False)
            save_file({k: v.contiguous() for k, v in base.backbone.state_dict().items()}, str(backbone_file))
    torch.manual_seed(1)
    args = dict(num_classes=3, class_names=["a", "b", "c"], pretrained=False, dropout=0.0, lr=1e-2, backbone_lr=1e-2)
    lora = kwargs.pop("lora", LORA)
    return ImageClassifier("resnet_tiny", backbone_checkpoint=str(backbone_file), lora=lora, **(args | kwargs))


def _trainer(tmp_path: Path, callbacks: list, max_epochs: int = 2, **kwargs) -> Trainer:
    return Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=callbacks,
        **kwargs,
    )


def test_base_weights_stay_bit_identical_while_adapters_and_head_train(tmp_path: Path) -> None:
    model = _model(tmp_path)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    # FreezeUnfreeze unfreezes "the backbone" at epoch 1: under LoRA that means its adapters, never its base.
    _trainer(tmp_path, [FreezeUnfreeze(1, bn_policy="freeze_all"), checkpoint]).fit(model, Blobs())
    after = model.state_dict()
    base = {f"backbone.{n}" for n in model.frozen_base}
    assert base and all(torch.equal(before[k], after[k]) for k in base)
    adapters = [k for k in after if ".lora_" in k]
    assert adapters and any(not torch.equal(before[k], after[k]) for k in adapters if "lora_B" in k)
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in after if ".lora_" in n} | {"head.1.weight", "head.1.bias"}

    # The checkpoint holds what trains (and the BatchNorm statistics), not the base weights, plus their fingerprint.
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not base & set(saved["state_dict"])
    assert {k for k in saved["state_dict"] if ".lora_" in k} == set(adapters)
    assert saved["lora_base_fingerprint"] == model.base_fingerprint()
    optimizer_params = sum(len(g["params"]) for g in saved["optimizer_states"][0]["param_groups"])
    assert optimizer_params == len(trainable)  # the frozen base is in no optimizer group


def test_adapter_checkpoint_is_small_and_loads_only_onto_its_base(tmp_path: Path) -> None:
    model = _model(tmp_path)
    _trainer(tmp_path, [NoFreeze(), ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")]).fit(model, Blobs())
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    trained = {k: v.clone() for k, v in model.state_dict().items()}

    loaded = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    for key, value in trained.items():
        assert torch.equal(loaded.state_dict()[key], value), key

    full = _model(tmp_path, lora=None)
    _trainer(tmp_path / "full", [NoFreeze(), ModelCheckpoint(dirpath=tmp_path / "full", filename="full")]).fit(
        full, Blobs()
    )
    full_size = (tmp_path / "full" / "full.ckpt").stat().st_size
    assert ckpt.stat().st_size < full_size / 4, (ckpt.stat().st_size, full_size)

    # Other base weights (another backbone file under the same hyperparameters): refused with one line.
    other = tmp_path / "other.safetensors"
    torch.manual_seed(5)
    stranger = ImageClassifier("resnet_tiny", num_classes=3, pretrained=False)
    save_file({k: v.contiguous() for k, v in stranger.backbone.state_dict().items()}, str(other))
    with pytest.raises(ValueError, match="trained on other base weights"):
        ImageClassifier.load_from_checkpoint(
            ckpt, map_location="cpu", weights_only=True, backbone_checkpoint=str(other)
        )
    with pytest.raises(ValueError, match="holds LoRA adapters, but the model has none"):
        ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True, lora=None)


def test_resume_with_lora_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    whole = _model(tmp_path)
    _trainer(tmp_path / "a", [NoFreeze(), LRSchedule("cosine", warmup=2), every_epoch], max_epochs=3).fit(
        whole, Blobs()
    )
    resumed = _model(tmp_path)
    _trainer(tmp_path / "b", [NoFreeze(), LRSchedule("cosine", warmup=2)], max_epochs=3).fit(
        resumed, Blobs(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt")
    )
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_ddp_two_processes_without_find_unused_parameters(tmp_path: Path, monkeypatch) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    # An earlier DDP test in this process leaves its MASTER_PORT behind, possibly still bound: Lightning picks a free
    # port when none is set.
    monkeypatch.delenv("MASTER_PORT", raising=False)

    model = _model(tmp_path)
    ddp = DDPStrategy(start_method="spawn", process_group_backend="gloo")  # find_unused_parameters stays False
    trainer = _trainer(
        tmp_path, [NoFreeze(), SaveRankState(tmp_path)], devices=2, strategy=ddp, enable_checkpointing=False
    )
    trainer.fit(model, Blobs(n=32))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in rank0["end"]:
        assert torch.equal(rank0["end"][key], rank1["end"][key]), key
    changed = [k for k in rank0["end"] if not torch.equal(rank0["start"][k], rank0["end"][k])]
    assert changed and all(
        ".lora_" in k or k.startswith("head.") or "running_" in k or "num_batches" in k for k in changed
    ), changed


def test_merge_for_export_keeps_outputs_and_leaves_plain_layers(tmp_path: Path) -> None:
    model = _model(tmp_path)
    _trainer(tmp_path, [NoFreeze()], enable_checkpointing=False).fit(model, Blobs())
    model.eval()
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(images)
        merged = model.for_export()
        got = merged(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    keys = merged.state_dict().keys()
    assert not [k for k in keys if "lora_" in k or "base_layer" in k]
    plain = ImageClassifier("resnet_tiny", num_classes=3, pretrained=False, dropout=0.0)
    assert set(keys) == set(plain.state_dict().keys())  # loads into the model without LoRA


def test_export_script_merges_a_lora_run(tmp_path: Path, monkeypatch) -> None:
    from scripts.export import export
    from scripts.train import main

    monkeypatch.chdir(tmp_path)
    backbone = tmp_path / "base.safetensors"
    _model(tmp_path)  # writes the base file
    main([
        "fit", "--config", str(REPO / "configs/digits.yaml"), "--config", str(REPO / "configs/presets/lora.yaml"),
        "--model.init_args.backbone=resnet_tiny", f"--model.init_args.backbone_checkpoint={backbone}",
        "--model.init_args.pretrained=false", "--model.init_args.lora.target_modules=[conv1,conv2]",
        "--data.init_args.image_size=24", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1", "--test_after_fit=false",
    ])  # fmt: skip
    ckpt = next(tmp_path.rglob("last.ckpt"))
    written = export(str(ckpt), out=str(tmp_path / "export"), formats=("safetensors", "torchscript"))
    from safetensors.torch import load_file

    weights = load_file(written["safetensors"])
    assert weights and not [k for k in weights if "lora_" in k or "base_layer" in k]
    plain = ImageClassifier("resnet_tiny", num_classes=10, pretrained=False)
    plain.load_state_dict(weights)  # strict: a plain model, no peft needed to serve it


def test_plan_lists_the_adapter_parameters(tmp_path: Path, monkeypatch) -> None:
    from rich.console import Console

    from scripts.plan import plan

    monkeypatch.chdir(tmp_path)
    console = Console(record=True, width=150)
    phases = plan(
        [
            "--config", str(REPO / "configs/digits.yaml"), "--config", str(REPO / "configs/presets/lora.yaml"),
            "--model.init_args.backbone=resnet_tiny", "--model.init_args.pretrained=false",
            "--model.init_args.lora.target_modules=[conv1,conv2]", "--model.init_args.lora.r=4",
        ],
        console,
    )  # fmt: skip
    model = ImageClassifier("resnet_tiny", num_classes=10, pretrained=False, lora=LORA | {"r": 4})
    adapters = sum(p.numel() for n, p in model.backbone.named_parameters() if ".lora_" in n)
    rows = phases[-1]["groups"]
    assert sum(r["params"] for unit, r in rows.items() if unit != "head") == adapters
    assert "LoRA" in console.export_text()


def test_a_target_that_matches_nothing_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"model.lora.target_modules \['qkv'\] match no layer .*conv1"):
        ImageClassifier("resnet_tiny", num_classes=3, pretrained=False, lora={"target_modules": ["qkv"]})
    with pytest.raises(ValueError, match="model.lora has unknown keys"):
        ImageClassifier("resnet_tiny", num_classes=3, pretrained=False, lora={"rank": 4})


def test_lite0_pointwise_convolutions_take_adapters_and_merge_back() -> None:
    """EfficientNet-Lite0's convolutions are a Conv2d subclass peft cannot copy; its 1x1 ones become plain Conv2d
    with the same weights (same outputs), take adapters, and merge back within float tolerance."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = ImageClassifier("efficientnet_lite0", num_classes=3).eval()
    torch.manual_seed(0)
    model = ImageClassifier(
        "efficientnet_lite0", num_classes=3, lora={"target_modules": ["_expand_conv", "_project_conv"]}
    ).eval()
    assert len(model.adapted_layers) == 31
    with torch.no_grad():
        torch.testing.assert_close(model(images), plain(images), rtol=0, atol=0)  # B = 0: no change at the start
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        expected = model(images)
        assert not torch.allclose(expected, plain(images))
        merged = model.for_export()(images)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
