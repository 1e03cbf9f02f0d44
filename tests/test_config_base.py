"""configs/base.yaml holds what every experiment shares (trainer settings, loggers, callbacks); an experiment YAML holds
only what differs and names its runs once (``name``, default: its file name). The CLI (scripts/train.py) and
scripts/experiments.py (sweeps, cross-validation) compose them the same way, and a run's saved config stands alone."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest
import yaml

from scripts.experiments import BASE_CONFIG, compose, load_config, read_yaml, set_key, with_overrides, write_config
from scripts.train import main
from tests.conftest import REPO

EXPERIMENTS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p != BASE_CONFIG)
SHARED = ("LearningRateMonitor", "RichProgressBar")  # the base's callbacks that run after an experiment's own


def effective(*args: str) -> dict:
    """The config ``scripts/train.py fit <args>`` runs, as ``--print_config`` shows it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return yaml.safe_load(out.getvalue())


def _kind(entry: dict) -> str:
    return entry["class_path"].rsplit(".", 1)[-1]


def _loggers(config: dict) -> dict[str, dict]:
    return {_kind(entry): entry["init_args"] for entry in config["trainer"]["logger"]}


def test_compose_merges_mappings_replaces_lists_and_appends_with_plus() -> None:
    base = {
        "trainer": {"devices": 1, "precision": "32-true", "callbacks": [{"class_path": "a.A"}], "logger": [1, 2]},
        "model": {"class_path": "m.M", "init_args": {"lr": 1, "dropout": 0.1}},
    }
    merged = compose(
        base,
        {
            "trainer": {"devices": 2, "callbacks+": [{"class_path": "b.B"}], "logger": [3]},
            "model": {"class_path": "m.M", "init_args": {"lr": 2}},
        },
    )
    assert merged["trainer"] == {
        "devices": 2,
        "precision": "32-true",
        "callbacks": [{"class_path": "a.A"}, {"class_path": "b.B"}],
        "logger": [3],
    }
    assert merged["model"]["init_args"] == {"lr": 2, "dropout": 0.1}
    other = compose(base, {"model": {"class_path": "n.N", "init_args": {"x": 1}}})  # another class: its own args only
    assert other["model"] == {"class_path": "n.N", "init_args": {"x": 1}}
    assert base["trainer"]["callbacks"] == [{"class_path": "a.A"}]  # the base is not modified


def test_the_base_is_not_an_experiment() -> None:
    base = read_yaml(BASE_CONFIG)
    assert "model" not in base and "data" not in base
    assert REPO / "configs" / "digits.yaml" in EXPERIMENTS and BASE_CONFIG not in EXPERIMENTS


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.stem)
def test_an_experiment_holds_only_what_differs_from_the_base(config: Path) -> None:
    own, base = read_yaml(config), read_yaml(BASE_CONFIG)
    trainer = own.get("trainer", {})
    assert "logger" not in trainer, "the loggers come from configs/base.yaml, named by the experiment's name"
    repeated = {k: v for k, v in trainer.items() if k in base["trainer"] and base["trainer"][k] == v}
    assert not repeated, f"{config.name} repeats settings of configs/base.yaml: {repeated}"
    assert own.get("seed_everything", base["seed_everything"]) == base["seed_everything"]
    assert "seed_everything" not in own
    assert "name" not in own or own["name"] != config.stem  # its file name is its name already


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.stem)
def test_an_experiment_runs_the_base_plus_its_own_settings(config: Path, tmp_path: Path) -> None:
    own, base = read_yaml(config), read_yaml(BASE_CONFIG)
    name = own.get("name", config.stem)
    printed = effective("--config", str(config))
    assert printed["name"] == name and printed["seed_everything"] == 42
    trainer = printed["trainer"]
    for key in ("accelerator", "devices", "precision", "log_every_n_steps"):
        assert trainer[key] == own.get("trainer", {}).get(key, base["trainer"][key]), key
    # One name, everywhere: the run folder runs/<name>/version_N and the W&B run, group and tags.
    loggers = _loggers(printed)
    assert list(loggers) == ["CSVLogger", "WandbLogger"]
    assert loggers["CSVLogger"]["save_dir"] == "runs" and loggers["CSVLogger"]["name"] == name
    wandb = loggers["WandbLogger"]
    assert (wandb["name"], wandb["group"]) == (name, name)
    assert wandb["tags"] == own.get("tags", [name])
    assert (wandb["project"], wandb["log_model"]) == ("finetune-template", False)
    # The callbacks: a checkpoint first, the experiment's own in its order, the LR monitor and progress bar last.
    kinds = [_kind(c) for c in trainer["callbacks"]]
    listed = own["trainer"].get("callbacks") or own["trainer"].get("callbacks+") or []
    expected = [_kind(c) for c in listed if _kind(c) not in SHARED]
    if "callbacks+" in own["trainer"]:
        expected = ["Checkpoint", *expected]
    assert kinds == [*expected, *SHARED]
    checkpoint = trainer["callbacks"][0]["init_args"]
    assert checkpoint["save_last"] is True and checkpoint["auto_insert_metric_name"] is False
    assert checkpoint["monitor"].split("/")[-1] in checkpoint["filename"]
    # scripts/experiments.py (sweeps, cv) sees the same experiment: its composed dict, run alone, is this config.
    composed = write_config(load_config(config), tmp_path / config.name)
    assert effective("--config", str(composed)) == printed


def test_renaming_a_copied_experiment_is_one_line(tmp_path: Path) -> None:
    copy = tmp_path / "my_digits.yaml"
    shutil.copy(REPO / "configs" / "digits.yaml", copy)

    def names(config: dict) -> set:
        loggers = _loggers(config)
        wandb = loggers["WandbLogger"]
        return {config["name"], loggers["CSVLogger"]["name"], wandb["name"], wandb["group"], *wandb["tags"]}

    assert names(effective("--config", str(copy))) == {"my_digits"}  # a copy is named after its file
    assert names(load_config(copy)) == {"my_digits"}
    copy.write_text("name: renamed\n" + copy.read_text())
    assert names(effective("--config", str(copy))) == {"renamed"}
    assert names(load_config(copy)) == {"renamed"}
    assert names(effective("--config", str(copy), "--name", "from_the_command_line")) == {"from_the_command_line"}


def test_a_logger_that_names_itself_keeps_its_name(tmp_path: Path) -> None:
    own = tmp_path / "own_loggers.yaml"
    own.write_text(
        "trainer:\n  logger:\n"
        "    - class_path: lightning.pytorch.loggers.CSVLogger\n      init_args: {save_dir: out, name: mine}\n"
        "    - class_path: lightning.pytorch.loggers.TensorBoardLogger\n      init_args: {save_dir: out}\n"
    )
    printed = effective("--config", str(REPO / "configs" / "digits.yaml"), "--config", str(own))
    assert printed["name"] == "digits"  # the first config file names the experiment
    assert [(c["init_args"]["save_dir"], c["init_args"]["name"]) for c in printed["trainer"]["logger"]] == [
        ("out", "mine"),
        ("out", "digits"),
    ]


def test_presets_compose_on_top(tmp_path: Path) -> None:
    digits = str(REPO / "configs" / "digits.yaml")
    printed = effective("--config", digits, "--config", str(REPO / "configs" / "presets" / "cpu.yaml"))
    assert printed["trainer"]["accelerator"] == "cpu" and _loggers(printed)["CSVLogger"]["name"] == "digits"
    assert [_kind(c) for c in printed["trainer"]["callbacks"]][-2:] == list(SHARED)
    printed = effective("--config", digits, "--config", str(REPO / "configs" / "presets" / "wandb.yaml"))
    assert _kind(printed["trainer"]["logger"][0]) == "CSVLogger"  # the preset adds W&B, the CSV logger stays
    wandb = next(c for c in printed["trainer"]["logger"] if _kind(c) == "WandbLogger")["init_args"]
    assert (wandb["name"], wandb["group"], wandb["tags"]) == ("digits", "digits", ["digits"])


@pytest.mark.parametrize("space", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_sweep_space_addresses_its_composed_experiment(space: Path) -> None:
    config = load_config(REPO / "configs" / space.name)
    for key in read_yaml(space)["space"]:
        set_key(with_overrides(config, {}), key, None)  # raises on a key the experiment lacks


def test_a_runs_saved_config_is_complete_and_reruns_without_the_base(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the loggers write under ./runs
    tiny = [
        "--model.init_args.backbone=resnet_tiny",
        "--model.init_args.pretrained=false",
        "--data.init_args.image_size=16",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        "--test_after_fit=false",
    ]
    config = REPO / "configs" / "digits.yaml"
    main(["fit", "--config", str(config), *tiny])
    run = tmp_path / "runs" / "digits" / "version_0"
    saved = read_yaml(run / "config.yaml")
    assert saved["name"] == "digits" and saved["trainer"]["logger"] and saved["trainer"]["callbacks"]
    with_base = effective("--config", str(run / "config.yaml"))
    # Without configs/base.yaml (moved, edited, another checkout): the saved config alone is the same run.
    monkeypatch.setattr("scripts.train.BASE_CONFIG", tmp_path / "no_base.yaml")
    assert effective("--config", str(run / "config.yaml")) == with_base
    assert _loggers(with_base)["CSVLogger"]["name"] == "digits"
    cli = main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert "test/acc" in cli.trainer.callback_metrics
    assert (tmp_path / "runs" / "digits" / "version_1" / "config.yaml").is_file()  # the test run: the same name
