"""What ``make sweep`` and ``make cv`` share: an experiment YAML edited by dotted keys, its loggers pointed at one
folder and one W&B group, a run of ``scripts/train.py`` in a fresh process, and the metric read back from the run.

A dotted key walks the YAML; inside a list (``trainer.callbacks``, ``trainer.logger``) a part names an element by its
class: ``trainer.callbacks.LRSchedule.init_args.warmup`` is the ``warmup`` of the ``LRSchedule`` callback.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def load_config(path: str | Path) -> dict:
    """The experiment YAML as a dict; an error names a file that is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment config {path} does not exist")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a YAML mapping of trainer/model/data settings")
    return config


def _child(node, part: str, key: str, create: bool):
    if isinstance(node, list):
        matches = [e for e in node if isinstance(e, dict) and str(e.get("class_path", "")).rsplit(".", 1)[-1] == part]
        if len(matches) != 1:
            names = [str(e.get("class_path", "?")).rsplit(".", 1)[-1] for e in node if isinstance(e, dict)]
            raise KeyError(f"{key}: {len(matches)} entries of class {part!r} in the list (it holds {names})")
        return matches[0]
    if not isinstance(node, dict):
        raise KeyError(f"{key}: {part!r} is inside a value, not a mapping")
    if part not in node or node[part] is None:
        if not create:
            raise KeyError(f"{key}: no {part!r} in the config")
        node[part] = {}
    return node[part]


def set_key(config: dict, key: str, value) -> None:
    """Set a dotted ``key`` (see the module docstring) to ``value``; a list entry or a missing block is an error,
    except ``init_args`` mappings, which are created."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, key, create=part == "init_args" or parts[i + 1 : i + 2] == ["init_args"])
    if isinstance(node, list) or not isinstance(node, dict):
        raise KeyError(f"{key}: cannot set {parts[-1]!r} there")
    node[parts[-1]] = value


def with_overrides(config: dict, overrides: dict) -> dict:
    edited = copy.deepcopy(config)
    for key, value in overrides.items():
        set_key(edited, key, value)
    return edited


def point_loggers(config: dict, save_dir: Path, name: str, version: str, group: str, run_name: str) -> dict:
    """A copy whose CSV/TensorBoard loggers write to ``save_dir/name/version`` and whose W&B logger joins ``group``
    as ``run_name`` (its files under ``save_dir``)."""
    edited = copy.deepcopy(config)
    loggers = edited.get("trainer", {}).get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if not isinstance(logger, dict):
            continue
        kind = str(logger.get("class_path", "")).rsplit(".", 1)[-1]
        args = logger.setdefault("init_args", {})
        if kind in ("CSVLogger", "TensorBoardLogger"):
            args |= {"save_dir": str(save_dir), "name": name, "version": version}
        elif kind == "WandbLogger":
            args |= {"group": group, "name": run_name, "save_dir": str(save_dir)}
    return edited


def write_config(config: dict, path: Path, header: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config, sort_keys=False)
    path.write_text("".join(f"# {line}\n" for line in header.splitlines()) + text)
    return path


def run_training(config: Path, args: list[str], log: Path) -> int:
    """``scripts/train.py fit --config <config> <args>`` in a fresh process (nothing is shared with other runs);
    its output goes to ``log``. Returns the exit status."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for inherited in ("FT_RUN_DIR", "WANDB_SERVICE"):  # the run's own folder and its own W&B service
        env.pop(inherited, None)
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "fit", "--config", str(config), *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd()).returncode


def metric_by_epoch(run_dir: Path, metric: str) -> dict[int, float]:
    """The last value of ``metric`` logged in each epoch of a run's ``metrics.csv``."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return {}
    values = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get(metric) not in (None, "") and row.get("epoch") not in (None, ""):
                values[int(float(row["epoch"]))] = float(row[metric])
    return values


def best_value(values: dict[int, float], direction: str) -> float | None:
    """The best finite value (``maximize`` or ``minimize``), or None when there is none."""
    finite = [v for v in values.values() if math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if direction == "maximize" else min(finite)


def tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    errors = [line for line in text if line.startswith("error:")]
    return " / ".join(errors[-1:] or text[-lines:])
