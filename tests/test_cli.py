"""The LightningCLI entry point and the YAML configs: every config validates and runs (fast_dev_run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning import Trainer

from scripts.train import main
from tests.conftest import REPO

EXPERIMENTS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "base.yaml")  # base: shared blocks
PRESETS = sorted((REPO / "configs" / "presets").glob("*.yaml"))


def _data_args(config: Path, image_folder: Path, tmp_path: Path) -> list[str]:
    """Arguments an experiment needs beyond its YAML in tests: a data folder where it asks for one."""
    data = yaml.safe_load(config.read_text())["data"]
    if "image_folder" in data["class_path"]:
        return ["--data.data_dir", str(image_folder)]
    if "streaming" in data["class_path"]:
        from datamodules.streaming import write_shards

        write_shards(image_folder, tmp_path / "shards", samples_per_shard=8)
        return ["--data.train_shards", str(tmp_path / "shards"), "--data.val_shards", str(tmp_path / "shards")]
    if "squad" in data["class_path"]:
        from tests.test_qa import CONTEXT, squad_json

        articles = {
            t: [(CONTEXT, "Who built the tower?", "Gustave Eiffel"), (CONTEXT, "Who sang?", None)] for t in "AB"
        }
        articles["Sky_(United_Kingdom)"] = articles.pop("B")  # the article the experiment holds out
        (tmp_path / data["init_args"]["train_file"]).write_text(json.dumps(squad_json(articles)))
        return ["--data.data_dir", str(tmp_path)]
    if "text_folder" in data["class_path"]:
        for label in ("pos", "neg"):  # a few documents per class folder
            for i in range(6):
                path = tmp_path / "texts" / label / f"{i}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"a {label} document number {i}")
        return ["--data.data_dir", str(tmp_path / "texts"), "--data.init_args.cache_dir", str(tmp_path / "cache")]
    if "text_lines" in data["class_path"]:
        return []  # MLM pre-training: chatterbot-corpus lines by default
    if "text" not in data["class_path"] and "chatterbot" not in data["class_path"]:
        return []
    cache = ["--data.init_args.cache_dir", str(tmp_path / "cache")]
    if "chatterbot" in data["class_path"]:
        return cache
    args = data["init_args"]
    header = args.get("column_names") is None
    for name in (args.get("train_file"), args.get("val_file"), args.get("test_file")):
        if name:  # a few rows in the file layout the experiment expects
            rows = [f"a fine day {i}\t{'yes' if i % 2 else 'no'}" for i in range(8)]
            head = [f"{args['text_column']}\t{args['label_column']}"] if header else []
            (tmp_path / name).write_text("\n".join(head + rows) + "\n")
    return ["--data.data_dir", str(tmp_path), *cache]


def test_there_are_experiments_and_the_default_exists() -> None:
    assert REPO / "configs" / "digits.yaml" in EXPERIMENTS and len(PRESETS) >= 4


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_config_fast_dev_run(config: Path, image_folder: Path, tmp_path: Path) -> None:
    cli = main(
        [
            "fit",
            "--config",
            str(config),
            *_data_args(config, image_folder, tmp_path),
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.state.finished
    assert any(key.startswith("test/") for key in cli.trainer.callback_metrics)  # the test stage ran after fit


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_config_validates(preset: Path, capsys) -> None:
    settings = yaml.safe_load(preset.read_text())
    if "model" in settings:  # a model preset (LoRA): checked on top of an experiment
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(REPO / "configs" / "digits.yaml"), "--config", str(preset), "--print_config"])
        assert exit_info.value.code == 0
        printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
        assert set(settings["model"]["init_args"]) <= set(printed)
        return
    parser = ArgumentParser()
    parser.add_class_arguments(Trainer, "trainer", fail_untyped=False)
    parser.parse_path(str(preset))  # raises on an unknown key or a wrongly typed value


def test_unknown_config_key_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "digits.yaml"), "--config", str(bad)])


def test_help_shows_the_model_docstrings(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "modules.image_classifier.ImageClassifier"])
    assert exit_info.value.code == 0
    assert "registry name of the backbone" in capsys.readouterr().out


def test_print_config_resolves_the_experiment(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "digits.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["backbone"] == "efficientnet_lite0"
    assert printed["data"]["class_path"] == "datamodules.digits.DigitsDataModule"


def test_config_is_saved_beside_the_checkpoints_and_reruns(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the loggers write under ./runs
    tiny = [
        "--model.init_args.backbone=resnet_tiny",
        "--model.init_args.pretrained=false",
        "--data.init_args.image_size=16",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
    ]
    main(["fit", "--config", str(REPO / "configs" / "digits.yaml"), *tiny])
    run = tmp_path / "runs" / "digits" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["init_args"]["backbone"] == "resnet_tiny"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"lr-AdamW/head", "lr-AdamW/backbone.stem", "lr-AdamW/backbone.layer4.no_wd"} <= set(header)
    # The saved config alone rebuilds the experiment: test the checkpoint with it.
    cli = main(
        [
            "test",
            "--config",
            str(run / "config.yaml"),
            "--ckpt_path",
            str(run / "checkpoints" / "last.ckpt"),
        ]
    )
    assert "test/acc" in cli.trainer.callback_metrics
    cli = main(
        [
            "predict",
            "--config",
            str(run / "config.yaml"),
            "--ckpt_path",
            str(run / "checkpoints" / "last.ckpt"),
            "--trainer.limit_predict_batches=1",
        ]
    )
    (batch,) = cli.trainer.predict_loop.predictions
    batch_size = yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]["batch_size"]
    assert batch["probs"].shape == (batch_size, 10) and torch.equal(batch["pred"], batch["probs"].argmax(-1))


def test_optimizer_is_chosen_in_the_config_and_gets_the_named_groups(tmp_path: Path) -> None:
    sgd = tmp_path / "sgd.yaml"
    sgd.write_text(
        "model:\n  init_args:\n    optimizer:\n      class_path: torch.optim.SGD\n"
        "      init_args:\n        momentum: 0.9\n        nesterov: true\n"
    )
    cli = main(
        [
            "--config",
            str(REPO / "configs" / "digits.yaml"),
            "--config",
            str(sgd),
            "--model.init_args.num_classes=10",
            "--model.init_args.backbone=resnet_tiny",
        ],
        run=False,
    )
    optimizer = cli.model.configure_optimizers()
    assert type(optimizer).__name__ == "SGD"
    assert {g["momentum"] for g in optimizer.param_groups} == {0.9}
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["backbone.layer1"] == 0.002
