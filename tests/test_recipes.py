"""The recipes comparison: the naive arm is the loop it claims to be, the table's statistics, LP-FT, honest testing
(val == test), the data splits the recipes rely on, and the LR finder's suggestion."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from torch import nn

from callbacks.linear_probe import LinearProbe, fit_linear
from datamodules.image_folder import ImageFolderDataModule
from datamodules.text_classification import TextClassificationDataModule
from modules.image_classifier import ImageClassifier
from scripts import naive
from scripts.compare import summarize
from scripts.lr_find import valley
from scripts.recipes import goal_met, task_table
from scripts.train import main
from tests.conftest import REPO


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that records, at every step, each group's LR and whether every parameter it holds trains."""

    log: list = []

    def step(self, closure=None):
        RecordingAdamW.log.append(
            [(g["lr"], all(p.requires_grad for p in g["params"]), len(g["params"])) for g in self.param_groups]
        )
        return super().step(closure)


def _text_data(tmp_path: Path, rows: int = 12) -> TextClassificationDataModule:
    lines = ["sentence\tlabel"] + [f"{'a fine' if i % 2 else 'a dull'} film number {i}\t{i % 2}" for i in range(rows)]
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    data = TextClassificationDataModule(
        str(tmp_path), "train.tsv", "dev.tsv", "test.tsv", cache_dir=str(tmp_path / "cache"), batch_size=4
    )
    data.setup("fit")
    return data


def test_naive_text_arm_is_the_plain_loop(tmp_path, monkeypatch) -> None:
    """One AdamW group over every weight at a fixed 5e-5, every training batch padded to 64 tokens."""
    from transformers import AutoModelForSequenceClassification

    RecordingAdamW.log = []
    monkeypatch.setattr(naive.torch.optim, "AdamW", RecordingAdamW)
    shapes, models = [], []
    load = AutoModelForSequenceClassification.from_pretrained

    def recording_load(*args, **kwargs):
        model = load(*args, **kwargs)
        model.register_forward_pre_hook(
            lambda m, a, kw: shapes.append((m.training, tuple(kw["input_ids"].shape))), with_kwargs=True
        )
        models.append(model)
        return model

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", recording_load)
    data = _text_data(tmp_path)
    result = naive.text(data, seed=0, epochs=2, batch_size=5)
    steps = RecordingAdamW.log
    assert len(steps) == 2 * 3  # 12 rows in batches of 5: 3 steps per epoch
    assert all(step == [(5e-5, True, len(list(models[0].parameters())))] for step in steps)
    train_shapes = [s for training, s in shapes if training]
    assert [s[1] for s in train_shapes] == [64] * 6 and [s[0] for s in train_shapes[:3]] == [5, 5, 2]
    assert all(s[1] < 64 for training, s in shapes if not training)  # evaluation pads to the batch's longest
    assert 0.0 <= result["test/acc"] <= 1.0 and result["wall_s"] > 0


def test_naive_arm_seeds_the_shuffle() -> None:
    first = [b.tolist() for b in naive.batches(10, 4, torch.Generator().manual_seed(3))]
    again = [b.tolist() for b in naive.batches(10, 4, torch.Generator().manual_seed(3))]
    other = [b.tolist() for b in naive.batches(10, 4, torch.Generator().manual_seed(4))]
    assert first == again != other and sorted(sum(first, [])) == list(range(10))


def test_the_table_gives_mean_and_sample_sd_and_judges_the_goal() -> None:
    runs = [{"arm": "naive", "test": {"test/acc": v}, "wall_s": 10.0} for v in (0.80, 0.82, 0.84)]
    runs += [{"arm": "default", "test": {"test/acc": v}, "wall_s": 12.0} for v in (0.86, 0.855, 0.865)]
    rows = summarize(runs, "test/acc")
    assert rows[0]["mean"] == pytest.approx(0.82) and rows[0]["std"] == pytest.approx(0.02)
    assert rows[1]["std"] == pytest.approx(statistics.stdev([0.86, 0.855, 0.865]))
    by_arm = {r["arm"]: r for r in rows}
    assert goal_met("sst2", by_arm) is True
    by_arm["default"] = by_arm["default"] | {"std": 0.011}
    assert goal_met("sst2", by_arm) is False
    table = task_table("sst2", rows, "test/acc", "mean >= 0.85 with sd <= 0.01", True)
    assert "| naive | 82.0 ± 2.0 | 80.0 / 82.0 / 84.0 | 10 |" in table and "met" in table
    squad = {"naive": {"mean": 40.0, "wall_s": 100.0}, "default": {"mean": 48.5, "wall_s": 90.0}}
    assert goal_met("squad", squad) is True
    assert goal_met("squad", squad | {"default": {"mean": 48.5, "wall_s": 110.0}}) is False
    assert goal_met("squad", {"default": squad["default"]}) is None


def test_fit_linear_solves_the_regularised_logistic_regression() -> None:
    torch.manual_seed(0)
    features = torch.randn(200, 5)
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0).long()
    weight, bias = fit_linear(features, labels, 2, l2=1e-2, max_iter=200)
    assert ((features @ weight.T + bias).argmax(-1) == labels).float().mean() > 0.97
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    loss = nn.functional.cross_entropy(features @ w.T + b, labels) + 1e-2 / 2 * w.pow(2).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-3 and b.grad.abs().max() < 1e-3  # a stationary point: the optimum


class _StopAtStart(LinearProbe):
    """Records the head and backbone as they are when training starts (after the probe), then stops."""

    def on_train_start(self, trainer, pl_module):
        self.backbone_before = {k: v.clone() for k, v in pl_module.backbone.state_dict().items()}
        self.head_before = pl_module.head[-1].weight.clone()
        super().on_train_start(trainer, pl_module)
        self.head_after = pl_module.head[-1].weight.clone()
        self.backbone_after = pl_module.backbone.state_dict()
        trainer.should_stop = True


def test_linear_probe_fits_the_head_before_the_first_step_and_leaves_the_backbone(tmp_path, image_folder) -> None:
    torch.manual_seed(0)
    data = ImageFolderDataModule(str(image_folder), image_size=16, batch_size=4, num_workers=0)
    model = ImageClassifier("resnet_tiny", pretrained=False, lr=1e-3, class_names=data.class_names)
    probe = _StopAtStart(l2=1e-3)
    trainer = Trainer(
        default_root_dir=tmp_path, max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[probe]
    )
    trainer.fit(model, datamodule=data)
    assert not torch.equal(probe.head_before, probe.head_after)
    assert all(torch.equal(probe.backbone_before[k], v) for k, v in probe.backbone_after.items())  # BN stats too
    # The head now separates the (linearly separable) colours on the frozen features.
    model.eval()
    images, labels = next(iter(data.train_dataloader()))
    with torch.no_grad():
        assert (model(images).argmax(-1) == labels).float().mean() == 1.0


def test_linear_probe_is_skipped_on_resume(tmp_path) -> None:
    class Resumed:
        global_step = 5

    LinearProbe().on_train_start(Resumed(), None)  # would fail on a None module if it probed


def test_linear_probe_refuses_a_hidden_layer_head() -> None:
    model = ImageClassifier("resnet_tiny", pretrained=False, num_classes=2, hidden_dim=8)
    from callbacks.linear_probe import _final_linear

    with pytest.raises(ValueError, match="remove LinearProbe or model.hidden_dim"):
        _final_linear(model)


def test_fit_warns_and_tests_the_last_weights_when_test_is_val(tmp_path, split_image_folder) -> None:
    import shutil

    shutil.rmtree(split_image_folder / "test")
    args = [
        "fit",
        "--config",
        str(REPO / "configs" / "image_folder.yaml"),
        "--data.data_dir",
        str(split_image_folder),
        "--model.init_args.backbone=resnet_tiny",
        "--model.init_args.pretrained=false",
        "--data.init_args.image_size=16",
        "--data.init_args.num_workers=0",
        "--trainer.max_epochs=2",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    with pytest.warns(UserWarning, match="the test split is the validation data"):
        cli = main(args)
    assert cli.results["tested"] == "last" and "test/acc" in cli.results["test"]
    shutil.copytree(split_image_folder / "val", split_image_folder / "test")
    cli = main(args)
    assert cli.results["tested"] != "last" and cli.results["tested"] == cli.results["best_checkpoint"]


def test_image_folder_test_dir_and_val_split_off_train(split_image_folder) -> None:
    data = ImageFolderDataModule(str(split_image_folder), val_dir=None, test_dir="val", val_fraction=0.25, seed=0)
    data.setup("fit")
    test_files = {p for p, _ in data.splits["test"]}
    assert test_files == {p for p in (split_image_folder / "val").rglob("*.jpg")} and not data.test_is_val
    train, val = ({p for p, _ in data.splits[s]} for s in ("train", "val"))
    assert len(val) == 6 and len(train) == 18 and not train & val and not (train | val) & test_files
    assert sorted(label for _, label in data.splits["val"]) == [0, 0, 1, 1, 2, 2]  # stratified
    with pytest.raises(ValueError, match="both 'val'"):
        ImageFolderDataModule(str(split_image_folder), val_dir="val", test_dir="val").setup("fit")


def test_squad_test_articles_are_never_trained_or_validated_on(tmp_path) -> None:
    from datamodules.squad import SquadDataModule
    from tests.test_qa import CONTEXT, squad_json

    articles = {t: [(CONTEXT, "Who built the tower?", "Gustave Eiffel")] for t in ("One", "Two", "Three")}
    (tmp_path / "squad.json").write_text(json.dumps(squad_json(articles)))
    data = SquadDataModule(
        str(tmp_path), "squad.json", None, holdout_articles=["Two"], test_articles=["Three"], tokenizer="bert-tiny"
    )
    data.setup("fit")
    titles = {split: {e.title for e in data.examples(split)} for split in ("train", "val", "test")}
    assert titles == {"train": {"One"}, "val": {"Two"}, "test": {"Three"}} and not data.test_is_val
    with pytest.raises(ValueError, match=r"data.test_articles names \['Four'\]"):
        SquadDataModule(str(tmp_path), "squad.json", None, test_articles=["Four"], tokenizer="bert-tiny").setup("fit")


def test_lr_valley_is_a_tenth_of_the_loss_minimum() -> None:
    lrs = [10 ** (-6 + i * 0.1) for i in range(60)]  # 1e-6 .. ~1
    # A loss that falls until lr = 1e-2, then climbs steeply (divergence); noisy at the start.
    losses = [2.0 + (0.3 if i < 3 else 0) - min(i, 40) * 0.04 + max(0, i - 40) ** 2 * 0.05 for i in range(60)]
    assert valley(lrs, losses) == pytest.approx(lrs[40] / 10)
    assert valley(lrs, [float("nan")] * 60) is None
