"""Packaging and what a run prints: the optional extras (``export``, ``hf``) fail with one line naming the extra,
a default run's output ends with its summary (no tips, no ``Total FLOPs: 0``, no W&B history after it), and the
``wandb`` preset adds W&B to an experiment without dropping its other loggers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

from datamodules.hub import load_hf_dataset
from scripts.export import EXPORT_PACKAGES, require_export_extra
from scripts.run_folders import RUN_ENV
from scripts.train import main, run_cli
from tests.conftest import REPO


def _missing(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make ``import name`` fail as it does when the package is not installed (None in sys.modules)."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def _one_line_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], function) -> str:
    """What the command line prints when ``function`` fails (scripts' ``run_cli``, no --debug)."""
    monkeypatch.delenv("FT_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["script.py"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(function)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("package", EXPORT_PACKAGES)
def test_a_missing_export_package_names_the_export_extra(package: str, monkeypatch, capsys) -> None:
    _missing(monkeypatch, package)
    with pytest.raises(ModuleNotFoundError, match=rf"{package}.*pip install -e '\.\[export\]'"):
        require_export_extra()
    err = _one_line_error(monkeypatch, capsys, require_export_extra)
    assert err.startswith("error: ONNX export needs ") and "pip install -e '.[export]'" in err


def test_export_extra_present_is_quiet() -> None:
    require_export_extra()  # make install installs the extra: nothing to say


def test_a_missing_datasets_package_names_the_hf_extra(monkeypatch, capsys) -> None:
    from datamodules.squad import SquadDataModule
    from datamodules.text_classification import TextClassificationDataModule

    _missing(monkeypatch, "datasets")
    with pytest.raises(ModuleNotFoundError, match=r"'glue'.*datasets.*pip install -e '\.\[hf\]'"):
        load_hf_dataset("glue", "sst2")
    # Both hub data paths go through it (before any download).
    with pytest.raises(ModuleNotFoundError, match=r"pip install -e '\.\[hf\]'"):
        TextClassificationDataModule(hf_dataset="glue", hf_config="sst2").load_splits()
    with pytest.raises(ModuleNotFoundError, match=r"pip install -e '\.\[hf\]'"):
        SquadDataModule(hf_dataset="squad").load_splits()
    err = _one_line_error(monkeypatch, capsys, lambda: load_hf_dataset("glue", "sst2"))
    assert "data.hf_dataset 'glue' needs the Hugging Face 'datasets' package" in err


def test_the_project_imports_without_its_extras() -> None:
    """The extras are imported where they are used only: the modules that use them load without them (a fresh
    process, where importing them fails as when they are not installed)."""
    blocked = [*EXPORT_PACKAGES, "datasets"]
    modules = ["scripts.export", "scripts.train", "datamodules.text_classification", "datamodules.squad"]
    code = f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); " + "; ".join(f"import {m}" for m in modules)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_extras_are_out_of_the_core_dependencies_and_make_install_installs_them() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=!~\[;\s]", spec, maxsplit=1)[0].lower() for spec in project["dependencies"]}
    extras = project["optional-dependencies"]
    for extra, packages in {"export": EXPORT_PACKAGES, "hf": ("datasets",)}.items():
        for package in packages:
            assert package not in core, f"{package} is a core dependency, not only in [{extra}]"
            assert any(spec.startswith(package + ">") for spec in extras[extra]), f"{package} is not in [{extra}]"
    assert '-e ".[dev,export,hf]"' in (REPO / "Makefile").read_text()  # make install, make test, make export


@pytest.mark.slow
def test_a_short_fit_ends_with_its_summary(tmp_path: Path) -> None:
    """The default output: no Lightning tip, no FLOPs line, no deprecation noise, and the summary is the last block
    (W&B says its last words before it: no history panel after)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    for inherited in (RUN_ENV, "WANDB_SERVICE", "FT_DEBUG", "WANDB_QUIET", "WANDB_SILENT"):
        env.pop(inherited, None)
    command = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        "fit",
        "--config",
        str(REPO / "configs" / "digits.yaml"),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    output = result.stdout
    assert result.returncode == 0, output[-3000:]
    for noise in ("💡 Tip", "litlogger", "Total FLOPs", "LeafSpec", "tensorboardX", "Run history", "Run summary"):
        assert noise not in output, f"{noise!r} in the output:\n{output[-3000:]}"
    assert "wandb: W&B syncing is set to `offline`" in output  # W&B still says where an offline run goes
    blocks = [block.strip() for block in output.split("\n\n") if block.strip()]
    last = blocks[-1].splitlines()
    assert last[0] == "=== summary ===", output[-3000:]
    assert last[-1].startswith("run directory: ") and not any(line.startswith("wandb:") for line in last)


def test_wandb_preset_adds_wandb_to_the_experiment_loggers(tmp_path: Path, monkeypatch) -> None:
    """`--config configs/digits.yaml --config configs/presets/wandb.yaml`: the experiment's CSV logger (metrics,
    plots) stays, and its one W&B logger goes online with checkpoints as artifacts under the experiment's name."""
    monkeypatch.chdir(tmp_path)  # the run folder is claimed under ./runs
    monkeypatch.setenv(RUN_ENV, "")  # then unset: the CLI sets it to the run folder, and monkeypatch undoes that
    monkeypatch.delenv(RUN_ENV)
    configs = REPO / "configs"
    cli = main(
        ["--config", str(configs / "digits.yaml"), "--config", str(configs / "presets" / "wandb.yaml")], run=False
    )
    loggers = cli.trainer.loggers
    assert [type(lg) for lg in loggers if isinstance(lg, CSVLogger)] == [CSVLogger]
    wandb = [lg for lg in loggers if isinstance(lg, LightningWandbLogger)]
    assert len(wandb) == 1, loggers
    assert wandb[0]._offline is False and wandb[0]._log_model is True
    assert wandb[0]._wandb_init["name"] == "digits" and wandb[0]._wandb_init["tags"] == ["digits"]
    assert Path(loggers[0].log_dir).resolve() == (tmp_path / "runs" / "digits" / "version_0").resolve()
