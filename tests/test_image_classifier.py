"""ImageClassifier: head from the data, metrics, checkpoints, predictions, parameter groups, overfitting."""

from __future__ import annotations

import csv

import pytest
import torch
from lightning import Trainer

from datamodules.image_folder import ImageFolderDataModule
from modules.image_classifier import ImageClassifier


def _trainer(tmp_path, **kwargs) -> Trainer:
    options = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return Trainer(**(options | kwargs))


def _data(root, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(root), image_size=32, batch_size=4, num_workers=0, **kwargs)


def test_the_cli_links_classes_and_image_size_from_the_data(split_image_folder) -> None:
    from scripts.train import main

    args = ["--config", "configs/image_folder.yaml", "--data.init_args.data_dir", str(split_image_folder),
            "--data.init_args.image_size", "48", "--model.init_args.backbone", "resnet_tiny",
            "--model.init_args.pretrained", "false", "--trainer.logger", "false"]  # fmt: skip
    model = main(args, run=False).model
    assert model.hparams.num_classes == 3
    assert model.hparams.class_names == ["blue", "green", "red"]  # listed before setup, from the class folders
    assert model.hparams.predict_image_size == 48 and model.image_side == 48
    assert model.head[-1].in_features == model.num_features == 512 and model.head[-1].out_features == 3


def test_a_model_without_classes_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="ImageClassifier needs num_classes or class_names"):
        ImageClassifier("resnet_tiny", pretrained=False)


def test_num_classes_disagreeing_with_the_data_is_an_error(tmp_path, split_image_folder) -> None:
    model = ImageClassifier("resnet_tiny", num_classes=5, pretrained=False)
    with pytest.raises(ValueError, match="model.num_classes is 5 but the data has 3 classes"):
        _trainer(tmp_path, max_steps=1).fit(model, _data(split_image_folder))


def test_class_names_in_another_order_than_the_data_are_an_error(tmp_path, split_image_folder) -> None:
    model = ImageClassifier("resnet_tiny", class_names=["red", "green", "blue"], pretrained=False)
    with pytest.raises(ValueError, match="differ from the data's"):
        _trainer(tmp_path, max_steps=1).fit(model, _data(split_image_folder))


def test_fixed_size_backbone_rejects_another_image_size() -> None:
    with pytest.raises(ValueError, match="backbone vit_tiny takes 32 px images but data.image_size is 16"):
        ImageClassifier("vit_tiny", num_classes=3, pretrained=False, predict_image_size=16)


def test_class_names_and_num_classes_must_agree() -> None:
    with pytest.raises(ValueError, match="num_classes is 3 but model.class_names has 2 names"):
        ImageClassifier("resnet_tiny", num_classes=3, class_names=["a", "b"], pretrained=False)


def test_checkpoint_round_trip_keeps_classes_and_outputs(tmp_path, split_image_folder) -> None:
    model = ImageClassifier("mobilenet_v3_tiny", pretrained=False, hidden_dim=16, class_names=["blue", "green", "red"])
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(model, _data(split_image_folder))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "model.ckpt")
    assert restored.hparams.class_names == ["blue", "green", "red"]
    assert restored.hparams.pretrained is False  # rebuilding never downloads weights again
    x = torch.rand(3, 3, 32, 32)
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), model(x))


def test_metrics_confusion_matrix_and_best_accuracy(tmp_path, split_image_folder) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from callbacks.tracking import RunReport

    data = _data(split_image_folder)
    model = ImageClassifier("resnet_tiny", pretrained=False, lr=3e-3, class_names=data.class_names)
    trainer = _trainer(
        tmp_path, max_epochs=2, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1, callbacks=[RunReport()]
    )
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/acc", "val/f1", "val/acc_best"} <= set(metrics)
    assert "val/acc_top5" not in metrics  # only 3 classes
    assert metrics["val/acc_best"] >= metrics["val/acc"]
    results = trainer.test(model, data, verbose=False)[0]
    assert {"test/acc", "test/f1", "test/loss"} <= set(results)
    matrix = model.confusion_matrix
    assert matrix.shape == (3, 3) and matrix.sum() == 6  # every test image counted once
    assert torch.isclose(matrix.diag().sum() / matrix.sum(), torch.tensor(results["test/acc"]))
    rows = list(csv.reader((tmp_path / "run" / "version_0" / "confusion_matrix.csv").read_text().splitlines()))
    assert rows[0] == ["true \\ predicted", "blue", "green", "red"] and rows[3][0] == "red"


def test_testing_without_a_logger_writes_no_file(tmp_path, split_image_folder) -> None:
    from callbacks.tracking import RunReport

    model = ImageClassifier("resnet_tiny", pretrained=False, num_classes=3)
    trainer = _trainer(tmp_path, callbacks=[RunReport()])  # logger=False: log_dir falls back to default_root_dir
    trainer.test(model, _data(split_image_folder), verbose=False)
    assert model.confusion_matrix.sum() == 6
    assert not (tmp_path / "confusion_matrix.csv").exists()


def test_top5_accuracy_beyond_five_classes() -> None:
    model = ImageClassifier("resnet_tiny", num_classes=7, pretrained=False)
    assert list(model.val_metrics.keys()) == ["val/acc", "val/acc_top5", "val/f1"]
    five = ImageClassifier("resnet_tiny", num_classes=5, pretrained=False)
    assert list(five.val_metrics.keys()) == ["val/acc", "val/f1"]


def test_metrics_stay_separate_when_the_first_batch_is_all_right() -> None:
    from torchmetrics.classification import MulticlassF1Score

    model = ImageClassifier("resnet_tiny", num_classes=7, pretrained=False)
    labels = torch.arange(7)
    right = torch.eye(7) * 5
    second = torch.eye(7).roll(1, dims=1) * 5 + torch.eye(7) * 4  # top-1 wrong, top-5 right
    model.val_metrics.update(right, labels)
    model.val_metrics.update(second, labels)
    values = model.val_metrics.compute()
    f1 = MulticlassF1Score(7)
    expected = f1(torch.cat([right, second]), torch.cat([labels, labels]))
    assert values["val/acc_top5"] == 1.0 and values["val/acc"] == 0.5
    assert values["val/f1"] == pytest.approx(expected.item()) and values["val/f1"] < 0.9


def test_predict_step_returns_indices_and_probabilities() -> None:
    model = ImageClassifier("efficientnet_lite_tiny", num_classes=4, pretrained=False).eval()
    out = model.predict_step((torch.rand(5, 3, 32, 32), torch.zeros(5)), 0)
    assert out["pred"].shape == (5,) and out["probs"].shape == (5, 4)
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(5))
    assert torch.equal(out["pred"], out["probs"].argmax(-1))


def test_parameter_groups_are_named_and_cover_every_parameter_once() -> None:
    model = ImageClassifier("resnet_tiny", num_classes=3, pretrained=False, lr=1e-3, backbone_lr=1e-4)
    optimizer = model.configure_optimizers()
    units = list(dict.fromkeys(g["layer_group"] for g in optimizer.param_groups))
    assert units == [
        "head",
        "backbone.stem",
        "backbone.layer1",
        "backbone.layer2",
        "backbone.layer3",
        "backbone.layer4",
    ]
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["head"] == 1e-3 and all(lr == 1e-4 for name, lr in lrs.items() if not name.startswith("head"))
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()) and len(set(grouped)) == len(grouped)


def test_normalization_is_the_backbones() -> None:
    lite = ImageClassifier("efficientnet_lite_tiny", num_classes=2, pretrained=False)
    resnet = ImageClassifier("resnet_tiny", num_classes=2, pretrained=False)
    grey = torch.full((1, 3, 2, 2), 0.5)
    assert lite.normalize(grey).abs().max() < 0.01  # TF-Lite: (x - 127) / 128
    torch.testing.assert_close(
        resnet.normalize(grey)[0, :, 0, 0],
        (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]),
    )


def test_overfitting_one_batch_drives_the_loss_down() -> None:
    torch.manual_seed(0)
    model = ImageClassifier("resnet_tiny", num_classes=4, pretrained=False, dropout=0.0, lr=1e-3, weight_decay=0.0)
    model.train()
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8) % 4
    optimizer = model.configure_optimizers()
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    assert torch.equal(model(images).argmax(-1), labels)
