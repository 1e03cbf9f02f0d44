"""Magnitude pruning: the asked sparsity is reached (per layer and global, one-shot and gradual), pruned weights stay
exactly zero through training, checkpoints hold the zeros in the plain model's keys, resume is exact, the report."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from callbacks.pruning import MagnitudePruning, magnitude_masks, scheduled_sparsity
from callbacks.unfreezing import FreezeUnfreeze
from modules.image_classifier import ImageClassifier
from tests.conftest import REPO, Blobs

BATCHES = 2  # training batches per epoch


class ZerosKept(Callback):
    """After every training batch: each pruned weight is exactly zero, and the pruned set never shrinks."""

    def __init__(self, pruning: MagnitudePruning):
        self.pruning, self.pruned, self.fractions = pruning, {}, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, mask in self.pruning.masks.items():
            weight = self.pruning.weights[name]
            assert torch.all(weight[~mask] == 0), f"{name}: a pruned weight moved at step {trainer.global_step}"
            before = self.pruned.get(name)
            assert before is None or torch.all(~mask[before]), f"{name}: a pruned weight came back"
            self.pruned[name] = ~mask
        self.fractions.append(self.pruning._fraction)


def _model() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier("resnet_tiny", num_classes=3, pretrained=False, dropout=0.0, lr=1e-2)


def _fit(tmp_path, pruning, max_epochs=3, ckpt_path=None, extra=(), logger=False):
    model = _model()
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=BATCHES,
        log_every_n_steps=1,
        limit_val_batches=1,
        accelerator="cpu",
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=[pruning, *extra],
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in extra),
    )
    trainer.fit(model, Blobs(), ckpt_path=ckpt_path)
    return model, trainer


def test_cubic_schedule_and_one_shot() -> None:
    assert [scheduled_sparsity(s, 2, 6, 0.8) for s in (0, 1, 2)] == [0.0, 0.0, 0.0]
    assert scheduled_sparsity(4, 2, 6, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))
    assert [scheduled_sparsity(s, 2, 6, 0.8) for s in (6, 100)] == [0.8, 0.8]
    assert scheduled_sparsity(5, 2, 6, 0.8, every_n_steps=2) == scheduled_sparsity(4, 2, 6, 0.8)  # held 2 steps
    assert [scheduled_sparsity(s, 3, 3, 0.5) for s in (2, 3, 9)] == [0.0, 0.5, 0.5]  # one-shot


def test_masks_prune_the_smallest_weights_exactly() -> None:
    torch.manual_seed(0)
    weights = {"a": torch.randn(10, 10), "b": torch.randn(30) * 10}
    per_layer = magnitude_masks(weights, 0.7, "layer")
    assert [int((~m).sum()) for m in per_layer.values()] == [70, 21]
    smallest = weights["a"].abs().flatten().sort().values
    assert weights["a"][~per_layer["a"]].abs().max() == smallest[69]
    whole = magnitude_masks(weights, 0.7, "global")
    assert sum(int((~m).sum()) for m in whole.values()) == 91
    assert int((~whole["a"]).sum()) > int((~whole["b"]).sum())  # the small-weight layer loses more
    # A pruned position stays pruned at the next update even if its weight would now rank high.
    weights["a"][~per_layer["a"]] = 100.0
    again = magnitude_masks(weights, 0.8, "layer", per_layer)
    assert torch.all(~again["a"][~per_layer["a"]]) and int((~again["a"]).sum()) == 80


@pytest.mark.parametrize(
    ("scope", "start", "end"),
    [
        ("layer", 0, 2),
        ("global", 1, 1),
        pytest.param("layer", 1, 1, marks=pytest.mark.slow),
        pytest.param("global", 0, 2, marks=pytest.mark.slow),
    ],
)
def test_fit_reaches_the_asked_sparsity_and_pruned_weights_stay_zero(tmp_path, scope, start, end) -> None:
    pruning = MagnitudePruning(0.8, scope=scope, start_epoch=start, end_epoch=end, every_n_steps=1)
    check = ZerosKept(pruning)
    initial = {k: v.clone() for k, v in _model().state_dict().items()}
    model, _ = _fit(tmp_path, pruning, max_epochs=3, extra=[check])
    rows = pruning.report()
    *layers, total = rows
    assert not any(r["layer"].startswith("head.") for r in layers)  # the head is not pruned by default
    assert len(layers) == len(pruning.weights) > 5
    assert total["sparsity"] == pytest.approx(0.8, abs=2e-3)
    if scope == "layer":
        for row in layers:
            assert row["zeros"] == round(0.8 * row["numel"]), row
    assert check.fractions[: BATCHES * start] == [0.0] * (BATCHES * start)  # nothing pruned before start_epoch
    if start != end:  # gradual: several intermediate sparsities, rising, on the way to the target
        ramp = sorted(set(check.fractions))
        assert len(ramp) >= 3 and check.fractions == sorted(check.fractions), check.fractions
    # The weights that were kept still trained.
    state = model.state_dict()
    name = "backbone.layer4.0.conv1.weight"
    kept = pruning.masks[name]
    assert not torch.equal(state[name][kept], initial[name][kept])


def test_frozen_weights_are_pruned_and_stay_zero_once_they_train(tmp_path) -> None:
    """Pruned at the start of epoch 0 while the backbone is frozen (FreezeUnfreeze), then trained from epoch 1."""
    pruning = MagnitudePruning(0.5, start_epoch=0, end_epoch=0)
    check = ZerosKept(pruning)
    _fit(tmp_path, pruning, max_epochs=2, extra=[FreezeUnfreeze(1), check])
    assert len(check.fractions) == 2 * BATCHES and set(check.fractions) == {0.5}
    assert pruning.report()[-1]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_include_head_and_layer_patterns() -> None:
    model = _model()
    assert any(n.startswith("head.") for n in MagnitudePruning(include_head=True).chosen(model))
    chosen = MagnitudePruning(layers=["backbone.layer4.*"], exclude=["*.downsample.*"]).chosen(model)
    assert chosen and all(n.startswith("backbone.layer4.") and "downsample" not in n for n in chosen)


def test_checkpoint_holds_the_zeros_under_the_plain_model_keys(tmp_path) -> None:
    """What scripts/export.py writes comes from this state dict: the zeros are permanent with no extra step. A best
    checkpoint from before the final sparsity (here chosen on the lowest sparsity: epoch 0) is warned about."""
    pruning = MagnitudePruning(0.6, start_epoch=1, end_epoch=1)
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="step", mode="min")
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    with pytest.warns(UserWarning, match=r"from epoch 0, before the final sparsity \(epoch 1\)"):
        _fit(tmp_path, pruning, max_epochs=2, extra=[best, every_epoch])
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", map_location="cpu", weights_only=True)
    plain = ImageClassifier("resnet_tiny", num_classes=3, pretrained=False)
    plain.load_state_dict(checkpoint["state_dict"], strict=True)  # no weight_orig / weight_mask keys
    saved = checkpoint["callbacks"][pruning.state_key]
    assert saved["applied"] == 0.6 and saved["masks"].keys() == pruning.weights.keys()
    for name, mask in saved["masks"].items():
        assert torch.all(checkpoint["state_dict"][name][~mask] == 0), name
        assert torch.all(plain.state_dict()[name][~mask] == 0), name


class StateAtStart(Callback):
    def __init__(self, pruning: MagnitudePruning):
        self.pruning = pruning

    def on_train_start(self, trainer, pl_module):
        self.applied, self.masks = self.pruning.applied, {k: v.clone() for k, v in self.pruning.masks.items()}


@pytest.mark.slow
def test_resume_continues_the_ramp_exactly(tmp_path) -> None:
    """Resumed at step 4, between two mask updates (steps 3 and 6): the checkpoint's masks are in force at once."""
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    settings = dict(sparsity=0.8, scope="global", start_epoch=0, end_epoch=3, every_n_steps=3)
    full = MagnitudePruning(**settings)
    full_model, _ = _fit(tmp_path / "a", full, max_epochs=4, extra=[every_epoch])
    checkpoint = tmp_path / "ckpt" / "epoch=1.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["callbacks"][full.state_key]
    assert saved["applied"] == scheduled_sparsity(3, 0, 6, 0.8) > 0

    resumed = MagnitudePruning(**settings)
    at_start = StateAtStart(resumed)
    resumed_model, _ = _fit(
        tmp_path / "b", resumed, max_epochs=4, ckpt_path=str(checkpoint), extra=[ZerosKept(resumed), at_start]
    )
    assert at_start.applied == saved["applied"]
    assert all(torch.equal(at_start.masks[k], saved["masks"][k]) for k in saved["masks"])
    for key, value in full_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    assert all(torch.equal(resumed.masks[k], full.masks[k]) for k in full.masks)
    assert resumed.report()[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_sparsity_csv_in_the_run_folder(tmp_path, capsys) -> None:
    pruning = MagnitudePruning(0.5, start_epoch=0, end_epoch=0)
    _, trainer = _fit(tmp_path, pruning, max_epochs=1, logger=CSVLogger(tmp_path, name="run"))
    with (Path(trainer.log_dir) / "sparsity.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["layer", "numel", "zeros", "sparsity"]
    assert rows[-1]["layer"] == "total" and float(rows[-1]["sparsity"]) == pytest.approx(0.5, abs=1e-3)
    assert {r["layer"] for r in rows[:-1]} == set(pruning.weights)
    assert "sparsity reached" in capsys.readouterr().out
    with (Path(trainer.log_dir) / "metrics.csv").open() as f:
        logged = [float(r["prune/sparsity"]) for r in csv.DictReader(f) if r.get("prune/sparsity")]
    assert logged and logged[-1] == pytest.approx(0.5, abs=1e-3)


def test_no_logger_writes_no_file(tmp_path) -> None:
    _fit(tmp_path, MagnitudePruning(0.5), max_epochs=1)
    assert not list(tmp_path.rglob("sparsity.csv"))


def test_bad_arguments_are_one_line_errors(tmp_path) -> None:
    for kwargs, message in [
        (dict(sparsity=1.0), r"sparsity is 1.0; it must be in \[0, 1\)"),
        (dict(sparsity=-0.1), r"sparsity is -0.1"),
        (dict(start_epoch=2, end_epoch=1), "start_epoch=2, end_epoch=1"),
        (dict(scope="net"), "choose global or layer"),
        (dict(every_n_steps=0), "every_n_steps is 0"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            MagnitudePruning(**kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"end_epoch is 3 but the run has 3 epochs \(0-2\)"):
        _fit(tmp_path, MagnitudePruning(0.5, end_epoch=3), max_epochs=3)
    with pytest.raises(ValueError, match="found no Linear or Conv weight"):
        _fit(tmp_path, MagnitudePruning(0.5, layers=["nothing.*"]), max_epochs=1)


def test_preset_and_its_documented_override(tmp_path, monkeypatch) -> None:
    """configs/presets/prune.yaml on configs/digits.yaml, and `--trainer.callbacks.init_args.sparsity=0.9`."""
    from scripts.run_folders import RUN_ENV
    from scripts.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(RUN_ENV, "")
    monkeypatch.delenv(RUN_ENV)
    configs = REPO / "configs"
    args = ["--config", str(configs / "digits.yaml"), "--config", str(configs / "presets" / "prune.yaml")]
    tiny = ["--model.init_args.backbone=resnet_tiny", "--model.init_args.pretrained=false"]
    for extra, sparsity in (([], 0.5), (["--trainer.callbacks.init_args.sparsity=0.9"], 0.9)):
        cli = main([*args, *tiny, *extra], run=False)
        pruning = [c for c in cli.trainer.callbacks if isinstance(c, MagnitudePruning)]
        assert len(pruning) == 1 and pruning[0].sparsity == sparsity
        assert (pruning[0].start_epoch, pruning[0].end_epoch) == (1, cli.trainer.max_epochs - 1)


def test_preset_runs_under_the_debug_preset(tmp_path, monkeypatch) -> None:
    """fast_dev_run (one batch of one epoch) is below the preset's end_epoch: a smoke test is allowed, not refused."""
    from scripts.train import main

    monkeypatch.chdir(tmp_path)
    configs = REPO / "configs"
    main(
        [
            "fit",
            *("--config", str(configs / "digits.yaml"), "--config", str(configs / "presets" / "prune.yaml")),
            *("--config", str(configs / "presets" / "debug.yaml")),
            "--model.init_args.backbone=resnet_tiny",
            "--model.init_args.pretrained=false",
            "--data.init_args.image_size=24",
        ]
    )
    with pytest.raises(ValueError, match="end_epoch is 5 but the run has 3 epochs"):
        main(
            [
                "fit",
                *("--config", str(configs / "digits.yaml"), "--config", str(configs / "presets" / "prune.yaml")),
                *("--model.init_args.backbone=resnet_tiny", "--model.init_args.pretrained=false"),
                "--trainer.max_epochs=3",
                "--trainer.logger=false",
            ]
        )
