"""Exact resume and run folders: a run killed after a checkpoint and resumed ends bit-identical to an uninterrupted
one, in the same folder and ``metrics.csv``; runs never share a folder; ``--ckpt_path last`` resumes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scripts.run_folders import RUN_ENV, claim_run_dir, metrics_before
from tests.conftest import REPO

TINY = [
    "--config",
    str(REPO / "configs" / "digits.yaml"),
    "--model.init_args.backbone=resnet_tiny",
    "--model.init_args.pretrained=false",
    "--data.init_args.image_size=24",
    "--data.init_args.batch_size=128",
]


def _args(*extra: str) -> list[str]:
    return [*TINY, *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline", FT_DEBUG="1")
    for inherited in (
        RUN_ENV,
        "WANDB_SERVICE",
    ):  # the W&B service of this process (kept by earlier tests) is not the run's
        env.pop(inherited, None)
    return env


def _train(cwd: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "fit", *_args(*extra)]
    result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert not check or result.returncode == 0, result.stderr[-3000:]
    return result


def _weights(ckpt: Path) -> tuple[dict, dict, tuple[int, int]]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return state["state_dict"], state["optimizer_states"][0]["state"], (state["epoch"], state["global_step"])


def _validation_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [{k: r[k] for k in ("epoch", "step", "val/acc", "val/loss")} for r in rows if r.get("val/acc")]


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    """digits, resnet_tiny, 4 epochs, FreezeUnfreeze at epoch 1, augmentation, shuffling and 2 loader workers on:
    SIGKILL after the epoch-1 checkpoint, then ``--run``: every tensor equal to the uninterrupted run's."""
    settings = ("--trainer.max_epochs=4", "--data.init_args.num_workers=2", "--test_after_fit=false")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir(), broken.mkdir()
    _train(whole, *settings)

    command = [sys.executable, str(REPO / "scripts" / "train.py"), "fit", *_args(*settings)]
    process = subprocess.Popen(command, cwd=broken, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = broken / "runs" / "digits" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if last.is_file() and _weights(last)[2][0] >= 1:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _weights(last)[2]
    assert killed_at[0] < 3, "killed too late to test a resume"

    run = broken / "runs" / "digits" / "version_0"
    result = _train(broken, *settings, "--run", str(run))
    assert f"resuming {run}" in result.stderr + result.stdout
    assert [p.name for p in (broken / "runs" / "digits").iterdir() if p.name.startswith("version_")] == ["version_0"]

    expected, resumed = _weights(whole / "runs/digits/version_0/checkpoints/last.ckpt"), _weights(last)
    assert resumed[2] == expected[2]  # (epoch, global_step)
    unequal = [k for k in expected[0] if not torch.equal(expected[0][k], resumed[0][k])]
    assert not unequal, f"{len(unequal)} of {len(expected[0])} tensors differ, e.g. {unequal[:3]}"
    for index, state in expected[1].items():
        for key, value in state.items():
            assert torch.equal(value, resumed[1][index][key]), (index, key)
    assert _validation_rows(run) == _validation_rows(whole / "runs/digits/version_0")


def test_runs_started_together_get_their_own_folders(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: claim_run_dir(tmp_path / "exp"), range(16)))
    assert len({f.name for f in folders}) == 16 and all(f.is_dir() for f in folders)


@pytest.mark.slow
def test_two_cli_runs_started_together_do_not_mix(tmp_path: Path) -> None:
    settings = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1")
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "fit", *_args(*settings, "--test_after_fit=false")]
    runs = [subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=600) for p in runs] == [0, 0]
    folders = sorted((tmp_path / "runs" / "digits").glob("version_*"))
    assert [f.name for f in folders] == ["version_0", "version_1"]
    for folder in folders:
        names = sorted(p.name for p in (folder / "checkpoints").iterdir())
        assert len(names) == 2 and names[0].startswith("epoch00-acc") and names[1] == "last.ckpt", names
        assert (folder / "config.yaml").is_file()
        assert [r["epoch"] for r in _validation_rows(folder)] == ["0"]


@pytest.mark.slow
def test_ckpt_path_last_resumes_the_newest_run_in_its_folder(tmp_path: Path) -> None:
    short = ("--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--test_after_fit=false")
    _train(tmp_path, "--trainer.max_epochs=1", *short)
    result = _train(tmp_path, "--trainer.max_epochs=2", "--ckpt_path", "last", *short)
    run = tmp_path / "runs" / "digits" / "version_0"
    assert f"resuming {run.resolve()} from last.ckpt (epoch 0, step 2)" in result.stderr
    assert [p.name for p in (tmp_path / "runs" / "digits").glob("version_*")] == ["version_0"]
    assert [r["epoch"] for r in _validation_rows(run)] == ["0", "1"]
    assert _weights(run / "checkpoints" / "last.ckpt")[2] == (1, 4)


def test_metrics_after_the_checkpoint_and_a_line_cut_by_the_kill_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,lr,step,val/acc\n0,,4,0.5\n,0.1,5,\n1,,9,0.6\n,0.1,10,\n2,,14,0.7\n,0.0")
    header, rows = metrics_before(path, epoch=1, step=10)
    assert header == ["epoch", "lr", "step", "val/acc"]
    assert [(r["epoch"], r["step"]) for r in rows] == [("0", "4"), ("", "5"), ("1", "9")]
