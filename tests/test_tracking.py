"""Tracking and serving: a tiny run through the CLI with the W&B logger offline (metrics, config, media recorded;
the API key nowhere), the run's local report, W&B run id kept on resume, eval and predict from a checkpoint without
the experiment's flags, and export parity (ONNX, TorchScript, safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from callbacks.tracking import wandb_api_key_configured
from scripts.train import main
from tests.conftest import REPO
from tests.wandb_records import read_run

SECRET = "0123456789abcdef-not-a-real-key-fedcba9876543210"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """One tiny digits run through the CLI, in its own folder, with a (fake) API key in the environment."""
    root = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("WANDB_API_KEY", SECRET)
        mp.setenv("WANDB_MODE", "offline")  # a key is configured, but this machine cannot reach W&B
        args = [
            "--config",
            str(REPO / "configs" / "digits.yaml"),
            "--model.backbone=efficientnet_lite_tiny",
            "--model.pretrained=false",
            "--data.image_size=32",
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2",
            "--trainer.log_every_n_steps=1",
        ]
        cli = main(["fit", *args])
        run_dir = Path(cli.trainer.log_dir).resolve()
        resumed = main(["fit", *args, "--trainer.max_epochs=3", f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"])
        assert resumed.trainer.current_epoch == 3
        # The best checkpoint after the resume (a better epoch replaces the first run's best) and the test metrics of
        # that checkpoint, which the resumed fit tested.
        best = str(Path(resumed.trainer.checkpoint_callback.best_model_path).resolve())
        metrics = {k: v.item() for k, v in resumed.trainer.callback_metrics.items()}
    return {"root": root, "run_dir": run_dir, "best": best, "metrics": metrics}


def _offline_runs(root: Path) -> list[Path]:
    return sorted((root / "runs" / "wandb").glob("offline-run-*"))


def test_wandb_offline_run_records_metrics_config_and_media(tiny_run: dict) -> None:
    runs = _offline_runs(tiny_run["root"])
    assert runs, "no offline W&B run was recorded"
    recorded = read_run(runs[0])
    resolved = recorded["config"]["config"]
    assert resolved["model"]["class_path"] == "modules.image_classifier.ImageClassifier"
    assert resolved["model"]["init_args"]["backbone"] == "efficientnet_lite_tiny"
    assert recorded["config"]["git_commit"] and recorded["config"]["lr"] == 0.005
    for key in ("train/loss", "val/acc", "val/f1", "test/acc", "lr-AdamW/head", "lr-AdamW/backbone.top"):
        assert key in recorded["history_keys"], key
    media = " ".join(recorded["files"])
    for name in ("images/plots/curves", "images/plots/lr", "images/test/confusion_matrix", "images/test/samples"):
        assert f"media/{name}_" in media, name
    assert "media/table/parameter_groups_" in media
    assert any((runs[0] / "files" / "media" / "images" / "test").glob("confusion_matrix*.png"))


def test_the_api_key_lands_nowhere(tiny_run: dict, capfd) -> None:
    for path in tiny_run["root"].rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in capfd.readouterr().out


def test_resume_continues_the_same_wandb_run(tiny_run: dict) -> None:
    ids = {p.name.rsplit("-", 1)[-1] for p in _offline_runs(tiny_run["root"])}
    assert len(_offline_runs(tiny_run["root"])) == 2 and len(ids) == 1


def test_run_directory_holds_the_local_report(tiny_run: dict) -> None:
    run_dir = tiny_run["run_dir"]
    for name in ("config.yaml", "metrics.csv", "curves.png", "lr.png", "confusion_matrix.png", "test_samples.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "git_commit.txt").read_text().strip()


def test_eval_and_predict_from_a_checkpoint_without_the_flags(tiny_run: dict, tmp_path: Path) -> None:
    from scripts.evaluate import evaluate
    from scripts.predict import predict, write_predictions

    # Data and model from the run's config.yaml (image_size 32 comes with it); the run tested 2 batches.
    result = evaluate(tiny_run["best"], limit_batches=2)
    assert result["metrics"]["test/acc"] == pytest.approx(tiny_run["metrics"]["test/acc"], abs=1e-6)
    assert Path(result["written"]).is_file()
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8), dtype=np.uint8)).save(images / f"{i}.png")
    rows = predict(tiny_run["best"], str(images))
    assert [Path(r["input"]).name for r in rows] == ["0.png", "1.png", "2.png"]
    assert all(r["label"] in [str(d) for d in range(10)] and sum(r["probs"].values()) == pytest.approx(1) for r in rows)
    out = write_predictions(rows, tmp_path / "p.csv")
    assert out.read_text().splitlines()[0].startswith("input,label,score,p_0")


def test_export_matches_the_model(tiny_run: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from scripts.export import check_parity, export
    from scripts.from_run import load_run

    written = export(tiny_run["best"], str(tmp_path))
    model, _, _ = load_run(tiny_run["best"])
    diffs = check_parity(model, written, model.example_input(), batch=5)
    assert set(diffs) == {"onnx", "torchscript"} and max(diffs.values()) < 1e-4
    fresh, _, _ = load_run(tiny_run["best"])
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(load_file(str(written["safetensors"])))
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(images), model.eval()(images))
    meta = json.loads(written["config"].read_text())
    assert meta["hparams"]["class_names"] == [str(d) for d in range(10)] and meta["input"]["shape"][2] == 32


def test_api_key_detection(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb"))
    assert not wandb_api_key_configured()
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password abc\n")
    assert wandb_api_key_configured()
