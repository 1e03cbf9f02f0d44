"""What ``make sweep`` and ``make cv`` share: an experiment YAML edited by dotted keys, its loggers pointed at one
folder and one W&B group, a run of ``scripts/train.py`` in a fresh process, and the metric read back from the run.
Also how an experiment YAML is composed (shared with ``scripts/train.py``): ``configs/base.yaml`` first, the
experiment on top, its runs named once.

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
# What every experiment shares (trainer settings, loggers, callbacks): train.py applies it before the experiment's
# --config, as the CLI's default config file; load_config composes it the same way.
BASE_CONFIG = REPO / "configs" / "base.yaml"
FOLDER_LOGGERS = ("CSVLogger", "TensorBoardLogger")  # their name is the runs' folder: <save_dir>/<name>/version_N
UNNAMED = (None, "lightning_logs")  # a CSV/TensorBoard logger left unnamed, or at Lightning's default name


def read_yaml(path: str | Path) -> dict:
    """A YAML file as a dict, as written; an error names a file that is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a YAML mapping of trainer/model/data settings")
    return config


def load_config(path: str | Path) -> dict:
    """The experiment YAML as ``scripts/train.py fit --config <path>`` sees it, as one plain dict: ``configs/base.yaml``
    with the experiment on top (see :func:`compose`), its runs named (:func:`name_runs`) and its callbacks in order
    (:func:`order_callbacks`). Written back with :func:`write_config`, it is a complete experiment config again."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment config {path} does not exist")
    config = read_yaml(path)
    if BASE_CONFIG.is_file() and path.resolve() != BASE_CONFIG.resolve():
        config = compose(read_yaml(BASE_CONFIG), config)
    name_runs(config, path.stem)
    order_callbacks(config)
    return config


def compose(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``, as the CLI merges config files: mappings merge key by key, except a class
    (``class_path``) replaced by another, which comes with its own ``init_args`` only; a list or value replaces the
    base's; ``key+:`` appends to the base's list."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(key, str) and key.endswith("+"):
            key = key[:-1]
            before = merged.get(key)
            before = [] if before is None else before if isinstance(before, list) else [before]
            merged[key] = before + copy.deepcopy(value if isinstance(value, list) else [value])
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            other_class = value.get("class_path", merged[key].get("class_path")) != merged[key].get("class_path")
            merged[key] = copy.deepcopy(value) if other_class else compose(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _class_name(entry) -> str:
    class_path = entry.get("class_path") if hasattr(entry, "get") else None
    return str(class_path or "").rsplit(".", 1)[-1]


def _entries(value) -> list:
    """The entries of a ``trainer.logger`` or ``trainer.callbacks`` value (a list, one entry, or none)."""
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list) else [value]


def name_runs(config, default_name: str | None = None) -> str | None:
    """Name the experiment's runs from one place: ``config["name"]`` (else ``default_name``, the experiment file's
    name) becomes the folder name of every CSV/TensorBoard logger left unnamed (``runs/<name>/version_N``) and the run
    name and group of the (first) W&B logger, whose tags default to ``config["tags"]`` or ``[name]``. A name a logger
    gives itself is kept. In place, on a plain dict or the CLI's namespace; returns the name (None: nothing named)."""
    name = config.get("name") or default_name
    if not name:
        return None
    config["name"] = name
    trainer = config.get("trainer")
    loggers = _entries(trainer.get("logger")) if trainer is not None else []
    wandb_seen = False
    for logger in loggers:
        if not hasattr(logger, "get"):
            continue  # a logger object, not a config entry
        kind = _class_name(logger)
        if kind.endswith("WandbLogger"):
            if wandb_seen:  # a later W&B logger (configs/presets/wandb.yaml) only adjusts the first: train.py folds it
                continue
            wandb_seen = True
        elif kind not in FOLDER_LOGGERS:
            continue
        if logger.get("init_args") is None:
            logger["init_args"] = type(logger)()
        args = logger["init_args"]
        if kind in FOLDER_LOGGERS:
            if args.get("name") in UNNAMED:
                args["name"] = name
            continue
        for key in ("name", "group"):
            if args.get(key) is None:
                args[key] = name
        if args.get("tags") is None:
            args["tags"] = list(config.get("tags") or [name])
    return name


def _observes(entry) -> bool:
    """Callbacks that show what the others did: the LR monitor reads the LR that LRSchedule (or any callback) set in
    the same hook, and the progress bar shows the metrics."""
    kind = _class_name(entry)
    return kind == "LearningRateMonitor" or kind.endswith("ProgressBar")


def order_callbacks(config) -> None:
    """Put ``LearningRateMonitor`` and progress bars after the other callbacks, keeping each group's order, so that
    callbacks an experiment appends to the base's (``trainer.callbacks+:``) act before the LR is logged. In place."""
    trainer = config.get("trainer")
    callbacks = trainer.get("callbacks") if trainer is not None else None
    if isinstance(callbacks, list):
        trainer["callbacks"] = [c for c in callbacks if not _observes(c)] + [c for c in callbacks if _observes(c)]


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
