"""Slow end-to-end runs of the real experiments (CI runs them; `make test-fast` skips them)."""

from __future__ import annotations

import warnings

import pytest

from scripts.train import main
from tests.conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow


def test_default_experiment_reaches_95_percent_on_digits(tmp_path, monkeypatch) -> None:
    """What `make train` runs: pretrained EfficientNet-Lite0 fine-tuned on the digits, offline."""
    monkeypatch.chdir(tmp_path)  # the experiment's loggers write under ./runs
    cli = main(["fit", "--config", str(REPO / "configs" / "digits.yaml")])
    metrics = cli.trainer.callback_metrics
    assert metrics["test/acc"] >= 0.95, f"test accuracy {metrics['test/acc']:.4f}"
    assert (tmp_path / "runs" / "digits" / "version_0" / "config.yaml").is_file()
    assert (tmp_path / "runs" / "digits" / "version_0" / "curves.png").is_file()


@pytest.mark.skipif(not (SHARED_DATA / "hymenoptera").is_dir(), reason="../shared/data/hymenoptera is absent")
def test_image_folder_on_ants_and_bees_skips_the_gif(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "image_folder.yaml"),
                "--data.data_dir",
                str(SHARED_DATA / "hymenoptera"),
                "--data.image_size=128",
                "--trainer.max_epochs=2",
            ]
        )
    messages = [str(w.message) for w in caught]
    assert any("imageNotFound.gif (not an image extension)" in m for m in messages)
    assert cli.datamodule.class_names == ["ants", "bees"]
    assert cli.trainer.callback_metrics["test/acc"] >= 0.75
