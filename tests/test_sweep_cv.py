"""Cross-validation folds of every data module, and ``make sweep`` / ``make cv``: a tiny sweep writes its table and a
best YAML that trains, pruning stops a bad trial, an interrupted sweep resumes without repeating finished trials, and
each fold is a fresh run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from lightning import Trainer

from datamodules.digits import DigitsDataModule
from datamodules.folds import fold_split
from datamodules.image_folder import ImageFolderDataModule
from datamodules.squad import SquadDataModule
from datamodules.text_classification import TextClassificationDataModule
from scripts import sweep as sweep_script
from scripts.experiments import load_config, set_key
from tests.conftest import REPO, Blobs
from tests.test_qa import CONTEXT, squad_json

# --- folds --------------------------------------------------------------------------------------------------------


def test_folds_are_disjoint_cover_the_data_and_keep_label_proportions() -> None:
    labels = [0] * 40 + [1] * 20 + [2] * 10
    vals = [fold_split(len(labels), 5, k, seed=3, labels=labels) for k in range(5)]
    held = [set(val) for _, val in vals]
    assert sum(len(h) for h in held) == len(labels) and set().union(*held) == set(range(len(labels)))
    for train, val in vals:
        assert not set(train) & set(val)
        assert Counter(labels[i] for i in val) == {0: 8, 1: 4, 2: 2}  # the proportions of the whole
    assert vals != [fold_split(len(labels), 5, k, seed=4, labels=labels) for k in range(5)]  # seeded


def test_a_class_smaller_than_the_folds_warns_and_falls_back_to_plain_folds() -> None:
    labels = [0] * 20 + [1] * 3  # class 1 cannot be in each of 5 folds
    with pytest.warns(UserWarning, match=r"a class has 3 item\(s\), fewer than data.num_folds=5"):
        vals = [fold_split(len(labels), 5, k, seed=0, labels=labels)[1] for k in range(5)]
    assert sorted(i for val in vals for i in val) == list(range(len(labels)))


def test_groups_stay_whole_in_one_fold() -> None:
    groups = ["a"] * 3 + ["b"] * 5 + ["c"] * 2 + ["d"] * 4
    for k in range(2):
        train, val = fold_split(len(groups), 2, k, seed=0, groups=groups)
        assert not {groups[i] for i in train} & {groups[i] for i in val}
    with pytest.raises(ValueError, match=r"has 4 group\(s\) \(articles\): fewer than data.num_folds=5"):
        fold_split(len(groups), 5, 0, seed=0, groups=groups)


BAD_FOLDS = [
    (5, 5, "data.fold is 5: give a fold from 0 to 4"),
    (0, 1, "cross-validation needs at least 2 folds"),
    (1, None, "data.fold is 1 but data.num_folds is not set"),
]


@pytest.mark.parametrize(("fold", "folds", "message"), BAD_FOLDS)
def test_bad_fold_settings_are_named(fold, folds, message) -> None:
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(num_folds=folds, fold=fold)


def test_in_memory_folds_never_touch_the_test_split() -> None:
    plain = DigitsDataModule(image_size=8)
    plain.setup()
    vals = []
    for k in range(3):
        dm = DigitsDataModule(image_size=8, num_folds=3, fold=k)
        dm.setup()
        assert torch.equal(dm.test_set.images, plain.test_set.images)
        vals.append({int(key) for key, _ in dm.val_keys})
        assert len(dm.train_set) + len(dm.val_set) == len(plain.train_set) + len(plain.val_set)
    assert not vals[0] & vals[1] and not vals[1] & vals[2]
    assert len(set().union(*vals)) == len(plain.train_set) + len(plain.val_set)


def test_image_folder_folds_cut_train_and_val_not_test(split_image_folder: Path) -> None:
    dms = [ImageFolderDataModule(str(split_image_folder), num_folds=3, fold=k) for k in range(3)]
    for dm in dms:
        dm.setup("fit")
        assert {p.parent.parent.name for p, _ in dm.splits["test"]} == {"test"}
        assert {p.parent.parent.name for p, _ in dm.splits["train"] + dm.splits["val"]} == {"train", "val"}
        assert set(Counter(label for _, label in dm.splits["val"]).values()) <= {3, 4}  # 11 per class in 3 folds
    held = [{key for key, _ in dm.val_keys} for dm in dms]
    assert sum(map(len, held)) == 33 and len(set().union(*held)) == 33  # 3 classes x (8 train + 3 val)


def test_text_folds_are_stratified_and_leave_the_test_file_out(tmp_path: Path) -> None:
    rows = [f"text {i}\t{'pos' if i % 3 else 'neg'}" for i in range(60)]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:45]) + "\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[45:]) + "\n")
    (tmp_path / "test.tsv").write_text("sentence\tlabel\nheld out\tpos\nnever seen\tneg\n")
    held = []
    for k in range(3):
        dm = TextClassificationDataModule(str(tmp_path), test_file="test.tsv", tokenizer="bert-tiny",
                                          cache_dir=str(tmp_path / "cache"), num_folds=3, fold=k)  # fmt: skip
        dm.setup("fit")
        assert [r["sentence"] for r in dm.rows["test"]] == ["held out", "never seen"]
        counts = Counter(label for _, label in dm.val_keys)  # 40 pos and 20 neg in 3 folds
        assert counts["pos"] in (13, 14) and counts["neg"] in (6, 7)
        held.append({key for key, _ in dm.val_keys})
    assert sum(map(len, held)) == 60 and len(set().union(*held)) == 60


def test_squad_folds_hold_whole_articles(tmp_path: Path) -> None:
    items = [(CONTEXT, "Who built the tower?", "Gustave Eiffel"), (CONTEXT, "When?", "1889")]
    (tmp_path / "squad.json").write_text(json.dumps(squad_json({t: items for t in ("A", "B", "C", "D")})))
    options = dict(train_file="squad.json", val_file=None, test_articles=["D"], tokenizer="bert-tiny", max_length=64,
                   doc_stride=16, max_query_length=16)  # fmt: skip
    titles = []
    for k in range(3):
        dm = SquadDataModule(str(tmp_path), num_folds=3, fold=k, **options)
        dm.setup("fit")
        assert {e.title for e in dm.examples("test")} == {"D"}
        train, val = ({e.title for e in dm.examples(s)} for s in ("train", "val"))
        assert not train & val and "D" not in train | val
        titles.append(val)
    assert sorted(t for v in titles for t in v) == ["A", "B", "C"]


# --- sweep --------------------------------------------------------------------------------------------------------


def test_dotted_keys_reach_a_callback_by_its_class() -> None:
    config = load_config(REPO / "configs" / "digits.yaml")
    set_key(config, "trainer.callbacks.FreezeUnfreeze.init_args.unfreeze_epoch", 2)
    set_key(config, "model.init_args.lr", 0.01)
    callback = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("FreezeUnfreeze"))
    assert callback["init_args"]["unfreeze_epoch"] == 2 and config["model"]["init_args"]["lr"] == 0.01
    with pytest.raises(KeyError, match=r"0 entries of class 'NoSuchCallback'"):
        set_key(config, "trainer.callbacks.NoSuchCallback.init_args.x", 1)


def _space(tmp_path: Path, **extra) -> Path:
    space = {"metric": "val/acc", "direction": "maximize", "pruner": "none"} | extra
    space["space"] = {"model.init_args.lr": {"float": [1e-3, 1e-1], "log": True}, "data.init_args.batch_size": {
        "categorical": [32, 64]}}  # fmt: skip
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def _fake_training(calls: list):
    """Stands in for a training run: writes the trial's metrics.csv with an accuracy that grows with the LR."""

    def run(config: Path, args: list[str], log: Path) -> int:
        settings = yaml.safe_load(config.read_text())
        csv_args = settings["trainer"]["logger"][0]["init_args"]
        folder = Path(csv_args["save_dir"]) / csv_args["name"] / csv_args["version"]
        folder.mkdir(parents=True, exist_ok=True)
        lr = settings["model"]["init_args"]["lr"]
        (folder / "metrics.csv").write_text(f"epoch,step,val/acc\n0,5,{0.5 + lr}\n1,10,{0.6 + lr}\n")
        for arg in args:  # the confirmation runs ask for their test results
            if arg.startswith("--results_file="):
                seed = int(next(a for a in args if a.startswith("--seed_everything=")).split("=")[1])
                Path(arg.split("=", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
                Path(arg.split("=", 1)[1]).write_text(json.dumps({"test": {"test/acc": 0.7 + lr + seed / 100}}))
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("ok\n")
        calls.append(csv_args["version"])
        return 0

    return run


def test_sweep_writes_the_table_importances_plot_and_a_complete_best_yaml(tmp_path: Path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(sweep_script, "run_training", _fake_training(calls))
    config = REPO / "configs" / "digits.yaml"
    sweep = sweep_script.Sweep(config, _space(tmp_path), tmp_path / "sweep")
    study = sweep.run(trials=4)
    best = sweep_script.report(sweep, study)
    assert calls == ["trial_000", "trial_001", "trial_002", "trial_003"]
    with (tmp_path / "sweep" / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["complete"] * 4
    best_row = max(rows, key=lambda r: float(r["val/acc"]))
    assert float(best_row["val/acc"]) == pytest.approx(0.6 + float(best_row["model.init_args.lr"]))
    results = (tmp_path / "sweep" / "results.md").read_text()
    assert "Parameter importance" in results and f"Best: trial {best_row['trial']}" in results
    assert (tmp_path / "sweep" / "search.png").stat().st_size > 1000
    chosen = yaml.safe_load(best.read_text())
    reference = load_config(config)  # the experiment as composed (configs/base.yaml + digits.yaml)
    assert chosen["model"]["init_args"]["lr"] == pytest.approx(float(best_row["model.init_args.lr"]))
    assert chosen["trainer"]["logger"] == reference["trainer"]["logger"]  # a plain experiment config again
    assert {k for k in chosen} == {k for k in reference}


def test_confirm_runs_the_best_and_the_default_over_seeds_on_the_test_split(tmp_path: Path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(sweep_script, "run_training", _fake_training(calls))
    sweep = sweep_script.Sweep(REPO / "configs" / "digits.yaml", _space(tmp_path), tmp_path / "sweep")
    best = sweep_script.report(sweep, sweep.run(trials=2))
    table = sweep_script.confirm(sweep, best, [0, 1])
    assert calls[2:] == ["default_seed0", "best_seed0", "default_seed1", "best_seed1"]
    best_lr = yaml.safe_load(best.read_text())["model"]["init_args"]["lr"]
    default_lr = load_config(REPO / "configs" / "digits.yaml")["model"]["init_args"]["lr"]
    expected = {"default": 0.7 + default_lr + 0.005, "best": 0.7 + best_lr + 0.005}
    for arm, mean in expected.items():
        assert f"| {arm} | {mean:.4f} ± 0.0071" in table
    assert table in (tmp_path / "sweep" / "results.md").read_text()


def test_an_interrupted_sweep_resumes_without_repeating_finished_trials(tmp_path: Path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(sweep_script, "run_training", _fake_training(calls))
    config = REPO / "configs" / "digits.yaml"
    sweep = sweep_script.Sweep(config, _space(tmp_path), tmp_path / "sweep")
    study = sweep.run(trials=2)
    cut = study.ask(sweep.distributions)  # a trial the interruption cut off: never told
    lr = cut.params["model.init_args.lr"]
    calls.clear()
    study = sweep_script.Sweep(config, _space(tmp_path), tmp_path / "sweep").run(trials=3)
    assert calls == ["trial_003"]  # trials 0 and 1 are not run again; the cut-off one runs again as trial 3
    states = {t.number: t.state.name for t in study.trials}
    assert states == {0: "COMPLETE", 1: "COMPLETE", 2: "FAIL", 3: "COMPLETE"}
    assert study.trials[3].params["model.init_args.lr"] == lr


def test_a_sweep_whose_trials_keep_failing_stops_and_names_the_log(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def broken(config: Path, args: list[str], log: Path) -> int:  # a run that exits 0 but logs no metric
        calls.append(log.parent.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("done\n")
        return 0

    monkeypatch.setattr(sweep_script, "run_training", broken)
    sweep = sweep_script.Sweep(REPO / "configs" / "digits.yaml", _space(tmp_path), tmp_path / "sweep")
    with pytest.raises(RuntimeError, match=r"3 trials in a row failed; .*trial_002"):
        sweep.run(trials=5)
    assert calls == ["trial_000", "trial_001", "trial_002"]
    assert (tmp_path / "sweep" / "trials" / "trial_000" / "trial.yaml").is_file()
    assert not (tmp_path / "sweep" / "trials" / "trial_000" / "config.yaml").exists()  # that name is train.py's


def test_pruning_stops_a_trial_whose_metric_is_bad(tmp_path: Path) -> None:
    import optuna

    from callbacks.sweep import OptunaPruning, make_pruner
    from modules.image_classifier import ImageClassifier

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(
        study_name="s", storage=storage, direction="minimize", pruner=make_pruner("median", 0, 2)
    )
    for _ in range(3):  # earlier trials that reached a loss of 0.01 at every epoch
        trial = study.ask()
        for epoch in range(4):
            trial.report(0.01, epoch)
        study.tell(trial, 0.01)
    bad = study.ask()
    status = tmp_path / "status.json"
    pruning = OptunaPruning(storage, "s", bad.number, "val/loss", "median", 0, 2, status_file=str(status))
    model = ImageClassifier("resnet_tiny", pretrained=False, num_classes=3, class_names=["a", "b", "c"])
    trainer = Trainer(max_epochs=4, limit_train_batches=2, limit_val_batches=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[pruning])  # fmt: skip
    trainer.fit(model, Blobs())
    assert trainer.current_epoch == 1  # stopped after the first validation, not 4 epochs
    assert json.loads(status.read_text()) == {"pruned": True, "epoch": 0}
    assert list(study.trials[bad.number].intermediate_values) == [0]


@pytest.mark.slow
def test_a_real_tiny_sweep_and_its_best_yaml_train(tmp_path: Path) -> None:
    tiny = ["--model.init_args.backbone=resnet_tiny", "--model.init_args.pretrained=false",
            "--data.init_args.image_size=16", "--trainer.max_epochs=2", "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "offline",
    }
    command = [sys.executable, str(REPO / "scripts" / "sweep.py"), "--config", str(REPO / "configs" / "digits.yaml"),
               "--space", str(_space(tmp_path)), "--trials", "3", "--out", str(tmp_path / "sweep"), *tiny]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "best config:" in result.stdout
    folders = sorted(p.name for p in (tmp_path / "sweep" / "trials").iterdir() if (p / "metrics.csv").is_file())
    assert folders == ["trial_000", "trial_001", "trial_002"]
    trained = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "fit", "--config",
                              str(tmp_path / "sweep" / "best.yaml"), *tiny], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "runs" / "digits" / "version_0" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_cv_runs_each_fold_fresh_and_saves_out_of_fold_predictions(tmp_path: Path) -> None:
    tiny = ["--model.init_args.backbone=resnet_tiny", "--model.init_args.pretrained=false",
            "--data.init_args.image_size=16", "--trainer.max_epochs=2", "--trainer.limit_train_batches=2"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "offline",
    }
    command = [sys.executable, str(REPO / "scripts" / "cv.py"), "--config", str(REPO / "configs" / "digits.yaml"),
               "--folds", "2", "--out", str(tmp_path / "cv"), *tiny]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "cv" / "results.json").read_text())
    assert [r["fold"] for r in record["folds"]] == [0, 1] and "test/acc" in record["summary"]
    for fold in range(2):  # a fresh run: its own folder, its step count starts from 0 (no state carried over)
        state = torch.load(tmp_path / "cv" / "folds" / f"fold_{fold}" / "checkpoints" / "last.ckpt", weights_only=True)
        assert (state["epoch"], state["global_step"]) == (1, 4)
    with (tmp_path / "cv" / "oof.csv").open() as f:
        oof = list(csv.DictReader(f))
    plain = DigitsDataModule(image_size=16)
    plain.setup()
    assert len(oof) == len({r["key"] for r in oof}) == len(plain.train_set) + len(plain.val_set)
    assert {r["fold"] for r in oof} == {"0", "1"}
    right = sum(r["label"] == r["pred"] for r in oof) / len(oof)
    assert record["oof_accuracy"] == pytest.approx(right)


def test_the_space_as_a_wandb_sweep_config(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(
        "metric: val/loss\ndirection: minimize\nspace:\n"
        "  model.init_args.lr: {float: [1.0e-4, 1.0e-2], log: true}\n"
        "  trainer.callbacks.FreezeUnfreeze.init_args.unfreeze_epoch: {int: [0, 2]}\n"
        "  data.init_args.crop_scale: {categorical: [[0.5, 1.0], [0.8, 1.0]]}\n"
    )
    sweep = sweep_script.Sweep(REPO / "configs" / "digits.yaml", space, tmp_path / "sweep")
    config = yaml.safe_load(sweep_script.wandb_sweep(sweep).read_text())
    assert config["metric"] == {"name": "val/loss", "goal": "minimize"}
    assert config["parameters"]["model.init_args.lr"] == {
        "distribution": "log_uniform_values",
        "min": 1e-4,
        "max": 1e-2,
    }
    assert config["parameters"]["trainer.callbacks.FreezeUnfreeze.init_args.unfreeze_epoch"]["distribution"] == (
        "int_uniform"
    )
    assert config["parameters"]["data.init_args.crop_scale"] == {"values": [[0.5, 1.0], [0.8, 1.0]]}
    assert config["command"][2:5] == ["scripts/sweep.py", "--config", str(REPO / "configs" / "digits.yaml")]


def test_list_choices_survive_the_study_storage(tmp_path: Path) -> None:
    space = {"data.init_args.crop_scale": {"categorical": [[0.5, 1.0], [0.8, 1.0]]}}
    choices = sweep_script.distributions(space)["data.init_args.crop_scale"].choices
    assert all(isinstance(c, str) for c in choices)  # what Optuna's SQLite storage keeps
    assert sweep_script.decoded(space, {"data.init_args.crop_scale": choices[1]}) == {
        "data.init_args.crop_scale": [0.8, 1.0]
    }
