"""Run folders: each run claims its own ``<save_dir>/<name>/version_N`` atomically, and a resumed run continues in the
folder (and the ``metrics.csv``) of the run it resumes.

Lightning picks ``version_N`` by listing the folder, so two runs started together got the same one (mixed metrics,
one ``config.yaml``, ``last.ckpt`` beside ``last-v1.ckpt``), and a resumed run got a new one. ``mkdir`` is atomic:
the first run to create ``version_N`` owns it, the other takes the next number.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import os
import re
from pathlib import Path

import torch

RUN_ENV = "FT_RUN_DIR"  # the claimed folder, inherited by the processes a DDP launcher starts
_VERSION = re.compile(r"version_(\d+)$")


def versions(root: Path) -> list[Path]:
    """The ``version_N`` folders of ``root``, oldest number first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _VERSION.match(p.name)]
    return sorted(found, key=lambda p: int(_VERSION.match(p.name).group(1)))


def claim_run_dir(root: Path) -> Path:
    """Create and return the next free ``root/version_N``; a folder another run created first is skipped."""
    root.mkdir(parents=True, exist_ok=True)
    existing = versions(root)
    number = int(_VERSION.match(existing[-1].name).group(1)) + 1 if existing else 0
    while True:
        folder = root / f"version_{number}"
        try:
            folder.mkdir()
        except FileExistsError:
            number += 1
            continue
        atexit.register(_remove_if_empty, folder)  # a run that failed before writing anything leaves no folder
        return folder


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()  # only succeeds on an empty folder


def newest_resumable(root: Path) -> Path | None:
    """The most recently written run under ``root`` that has a ``checkpoints/last.ckpt``."""
    runs = [p for p in versions(root) if (p / "checkpoints" / "last.ckpt").is_file()]
    return max(runs, key=lambda p: (p / "checkpoints" / "last.ckpt").stat().st_mtime, default=None)


def run_of_checkpoint(ckpt: Path) -> Path | None:
    """The run folder that wrote ``ckpt`` (``<run>/checkpoints/x.ckpt`` with ``<run>/config.yaml``), else None."""
    run = ckpt.resolve().parent.parent
    return run if ckpt.resolve().parent.name == "checkpoints" and (run / "config.yaml").is_file() else None


def checkpoint_position(ckpt: Path) -> tuple[int, int]:
    """``(epoch, global_step)`` stored in a Lightning checkpoint."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    return int(state.get("epoch", 0)), int(state.get("global_step", 0))


def metrics_before(path: Path, epoch: int, step: int) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a run's ``metrics.csv`` that a checkpoint at ``(epoch, step)`` had already seen: rows
    of that epoch or earlier, and rows without an epoch (the LR monitor's) below that step. What the interrupted run
    logged after its checkpoint is left out, since the resumed run logs it again."""
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])

    def seen(row: dict[str, str]) -> bool:
        try:
            if row.get("epoch"):
                return float(row["epoch"]) <= epoch
            return float(row.get("step") or "nan") < step
        except ValueError:  # a line cut short by the kill
            return False

    return header, [row for row in rows if None not in row and None not in row.values() and seen(row)]


def restore_metrics(experiment, header: list[str], rows: list[dict[str, str]]) -> None:
    """Write ``rows`` back into the CSV logger's ``metrics.csv`` (which Lightning deletes when it opens a folder);
    what the resumed run logs is appended after them."""
    if not header:
        return
    with open(experiment.metrics_file_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted(header))  # the order Lightning's writer appends in
        writer.writeheader()
        writer.writerows(rows)
    experiment.metrics_keys = sorted(header)


def is_launched_child() -> bool:
    """Whether this process was started by a DDP launcher for a rank other than 0 (it must not claim a folder)."""
    return any(os.environ.get(key, "0") not in ("", "0") for key in ("LOCAL_RANK", "NODE_RANK", "RANK"))
