"""`make plan` and `make lr-find`: the dry-run plan and the LR finder working with the engine."""

from __future__ import annotations

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.tuner import Tuner

from callbacks.lr_schedule import lr_factor
from callbacks.unfreezing import FreezeUnfreeze
from datamodules.image_folder import ImageFolderDataModule
from modules.image_classifier import ImageClassifier
from scripts.lr_find import engage_engine_during_sweep, lr_find
from scripts.plan import plan
from tests.conftest import REPO

TINY = [
    "--model.init_args.backbone=resnet_tiny",
    "--model.init_args.pretrained=false",
    "--data.init_args.image_size=16",
]


def test_plan_prints_each_phase_with_trainable_groups_and_scheduled_lrs(tmp_path) -> None:
    config = (REPO / "configs" / "digits.yaml").read_text()
    config = config.replace(
        "class_path: callbacks.unfreezing.FreezeUnfreeze", "class_path: callbacks.unfreezing.GradualUnfreezing"
    )
    config = config.replace("unfreeze_epoch: 1", "groups_per_epoch: 3")
    (tmp_path / "gradual.yaml").write_text(config)
    phases = plan(["--config", str(tmp_path / "gradual.yaml"), *TINY, "--data.init_args.batch_size=64"])
    # 6 epochs of 20 steps (1,257 training images in batches of 64), warmup 10%, GradualUnfreezing from epoch 1 with 3
    # groups per epoch.
    assert [p["epoch"] for p in phases] == [0, 1, 2]
    first, second, third = (p["groups"] for p in phases)
    assert [g for g, row in first.items() if row["trainable"]] == ["head"]
    assert {g for g, row in second.items() if row["trainable"]} == {
        "head",
        "backbone.layer2",
        "backbone.layer3",
        "backbone.layer4",
    }
    assert all(row["trainable"] for row in third.values())
    assert first["head"]["lr"] == pytest.approx(0.005 * lr_factor(0, 120, 12))
    assert second["backbone.stem"]["lr"] == pytest.approx(0.002 * lr_factor(20, 120, 12))
    assert third["head"]["lr"] == pytest.approx(0.005 * lr_factor(40, 120, 12))
    model = ImageClassifier("resnet_tiny", num_classes=10, pretrained=False)
    assert sum(row["params"] for row in first.values()) == sum(p.numel() for p in model.parameters())


def test_plan_of_the_default_recipe() -> None:
    phases = plan(["--config", str(REPO / "configs" / "digits.yaml"), *TINY])
    assert [(p["epoch"], sum(r["trainable"] for r in p["groups"].values())) for p in phases] == [(0, 1), (1, 6)]


class _Recording(ImageClassifier):
    """Records, at each optimizer step, every group's LR and which parameters have a gradient."""

    def on_before_optimizer_step(self, optimizer):
        self.seen = getattr(self, "seen", [])
        grads = {n.split(".")[0] + "." + n.split(".")[1] for n, p in self.named_parameters() if p.grad is not None}
        self.seen.append(({g["name"]: g["lr"] for g in optimizer.param_groups}, grads))


@pytest.mark.parametrize("freeze", [False, True])
def test_lr_finder_sweeps_the_head_keeps_ratios_and_the_first_phase(tmp_path, image_folder, freeze) -> None:
    torch.manual_seed(0)
    data = ImageFolderDataModule(str(image_folder), image_size=16, batch_size=4, num_workers=0)
    model = _Recording("resnet_tiny", pretrained=False, lr=1e-2, backbone_lr_ratio=0.1, class_names=data.class_names)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=5,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        callbacks=[FreezeUnfreeze(1)] if freeze else [],
    )
    trainer.strategy.connect(model)
    engage_engine_during_sweep(trainer, model)
    finder = Tuner(trainer).lr_find(
        model, datamodule=data, min_lr=1e-5, max_lr=1e-1, num_training=12, update_attr=False
    )
    heads = [lrs["head"] for lrs, _ in model.seen]
    assert len(heads) == 12 and heads == sorted(heads) and heads[-1] > 100 * heads[0]
    for lrs, _ in model.seen:
        assert lrs["backbone.layer3"] == pytest.approx(0.1 * lrs["head"])
    assert finder.results["lr"] == pytest.approx(heads)
    trained = set().union(*(grads for _, grads in model.seen))
    assert ("backbone.layer4" in trained) is not freeze and "head.1" in trained


def test_lr_find_script_saves_the_plot(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the experiment's loggers write under ./runs
    suggestion, plot = lr_find(
        [
            "--config",
            str(REPO / "configs" / "digits.yaml"),
            *TINY,
            f"--trainer.default_root_dir={tmp_path}",
        ],
        num_training=15,
        plot_path=str(tmp_path / "lr.png"),
    )
    assert plot.is_file() and plot.read_bytes()[:4] == b"\x89PNG"
    assert suggestion is None or 1e-6 <= suggestion <= 1.0
    assert not (tmp_path / "runs" / "digits").exists() and not (tmp_path / "runs" / "wandb").exists()  # no run used
    assert not (tmp_path / "config.yaml").exists() and not list(tmp_path.glob(".lr_find*"))


@pytest.mark.parametrize("experiment", ["squad", "pretrain_text"])
def test_plan_of_the_text_experiments_without_classes(experiment: str, tmp_path, image_folder) -> None:
    """`make plan EXP=squad` and `EXP=pretrain_text` called adopt_data, which QA and MLM modules lack."""
    from tests.test_cli import _data_args

    config = REPO / "configs" / f"{experiment}.yaml"
    args = ["--config", str(config), *_data_args(config, image_folder, tmp_path), "--model.init_args.encoder=bert-tiny"]
    args += ["--trainer.logger=false", "--trainer.max_epochs=2"]
    phases = plan(args)
    assert phases and "head" in phases[-1]["groups"] and phases[-1]["groups"]["head"]["trainable"]
    groups = {g for phase in phases for g in phase["groups"]}
    assert {"backbone.embeddings", "backbone.layer0", "backbone.layer1"} <= groups  # bert-tiny's groups
