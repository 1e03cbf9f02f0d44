"""Hyper-parameter search with Optuna: ``make sweep EXP=<exp> TRIALS=N [CV=K] [ARGS=...]``.

    python scripts/sweep.py --config configs/ants_bees.yaml --space configs/sweeps/ants_bees.yaml --trials 12

* The search space is a YAML beside the experiment (``configs/sweeps/<exp>.yaml``): the metric, its direction, the
  pruner, and config keys (dotted; a callback by its class name) with their distributions::

      metric: val/loss
      direction: minimize
      pruner: median            # median, asha or none
      space:
        model.init_args.lr: {float: [1.0e-4, 1.0e-2], log: true}
        trainer.callbacks.LRSchedule.init_args.warmup: {float: [0.0, 0.3]}
        data.init_args.batch_size: {categorical: [16, 32]}

* Each trial is one run of ``scripts/train.py`` in its own process, with its own run folder
  (``<out>/trials/trial_NNN``) and W&B run, all in the W&B group ``sweep-<exp>``. One process per trial is what keeps
  DDP trials right: a trial is a run, not a rank. ``callbacks.sweep.OptunaPruning`` reports every epoch's metric and
  stops trials the pruner rejects (decided on rank 0).
* The study is stored in SQLite (``<out>/study.db``): running the same command again resumes it, without repeating
  finished trials (a trial cut off by the interruption runs again); ``--fresh`` starts over.
* At the end: ``<out>/results.md`` and ``trials.csv`` (every trial), the importance of each parameter, ``search.png``
  (the objective by trial and the importances, also logged to W&B), and ``<out>/best.yaml``: the experiment with the
  best parameters, a complete config that ``make train CONFIG=<out>/best.yaml`` runs as is.
* ``--confirm 0 1 2``: then the best configuration and the experiment as shipped run over those seeds, tested on the
  test split the search never looked at (``make sweep ... CONFIRM="0 1 2"``); the table goes into ``results.md``.
* ``--cv K``: a trial's objective is the mean over K folds (``make cv``'s folds), each fold a fresh run.
* ``--sweep wandb`` (``--backend wandb``) writes the same space as a W&B sweep (``<out>/wandb_sweep.yaml``) whose
  agent runs trials through this script (``--wandb-trial``), for those who prefer W&B's sweep UI.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from scripts.experiments import (
    best_value,
    load_config,
    metric_by_epoch,
    point_loggers,
    read_yaml,
    run_training,
    set_key,
    tail,
    with_overrides,
    write_config,
)

KINDS = ("float", "int", "categorical")
MAX_FAILED_IN_A_ROW = 3  # the sweep stops (with the last log named) after this many failed trials in a row


def distributions(space: dict) -> dict:
    """Optuna distributions of the ``space`` block; an unknown kind or a bad range is an error naming the key."""
    import optuna.distributions as d

    out = {}
    for key, spec in space.items():
        kinds = [k for k in KINDS if k in (spec or {})]
        if len(kinds) != 1:
            raise ValueError(f"search space key {key}: give one of {', '.join(KINDS)} (got {spec})")
        kind, values = kinds[0], spec[kinds[0]]
        if kind == "categorical":
            if not isinstance(values, list) or not values:
                raise ValueError(f"search space key {key}: categorical needs a non-empty list")
            out[key] = d.CategoricalDistribution([_choice(v) for v in values])
            continue
        if not isinstance(values, list) or len(values) != 2 or not values[0] < values[1]:
            raise ValueError(f"search space key {key}: {kind} needs [low, high] with low < high (got {values})")
        cls = d.FloatDistribution if kind == "float" else d.IntDistribution
        low, high = (float(v) for v in values) if kind == "float" else (int(v) for v in values)
        step = spec.get("step", None if kind == "float" else 1)
        out[key] = cls(low, high, log=bool(spec.get("log", False)), step=step)
    return out


def _choice(value):
    """A categorical choice as Optuna stores it: scalars as they are, a list (``crop_scale: [0.5, 1.0]``) as its YAML
    text (Optuna's storage keeps scalars only); :func:`decoded` turns it back."""
    return (
        value
        if value is None or isinstance(value, bool | int | float | str)
        else yaml.safe_dump(value, default_flow_style=True).strip()
    )


def decoded(space: dict, params: dict) -> dict:
    """The trial's parameters as config values (list choices back from their YAML text)."""
    out = dict(params)
    for key, value in params.items():
        choices = (space.get(key) or {}).get("categorical") or []
        out[key] = next((c for c in choices if _choice(c) == value), value)
    return out


def read_space(path: Path) -> dict:
    space = read_yaml(path)
    if not isinstance(space.get("space"), dict) or not space["space"]:
        raise ValueError(f"{path}: no 'space' mapping of config keys to distributions")
    space.setdefault("metric", "val/acc")
    space.setdefault("direction", "maximize")
    space.setdefault("pruner", "median")
    if space["direction"] not in ("maximize", "minimize"):
        raise ValueError(f"{path}: direction is {space['direction']!r}; use maximize or minimize")
    return space


class Sweep:
    """One Optuna study over an experiment (see the module docstring)."""

    def __init__(self, config: Path, space: Path, out: Path, cv: int = 0, seed: int = 0, extra: list[str] = ()):
        self.config_path, self.base, self.space = config, load_config(config), read_space(space)
        self.distributions = distributions(self.space["space"])
        self.exp, self.out, self.cv, self.seed, self.extra = config.stem, out, cv, seed, list(extra)
        for key in self.distributions:  # fail now, not in trial 7
            set_key(with_overrides(self.base, {}), key, None)
        self.max_epochs = int(self.base.get("trainer", {}).get("max_epochs") or 1)
        if not _has_csv(self.base):
            raise ValueError(
                f"{config}: a sweep reads each trial's metrics.csv: list a CSVLogger first in trainer.logger"
            )

    @property
    def storage(self) -> str:
        return f"sqlite:///{(self.out / 'study.db').resolve()}"

    def study(self, fresh: bool = False):
        import optuna

        from callbacks.sweep import make_pruner

        if fresh and (self.out / "study.db").exists():
            (self.out / "study.db").unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            study_name=self.exp,
            storage=self.storage,
            direction=self.space["direction"],
            sampler=optuna.samplers.TPESampler(seed=self.seed),
            pruner=make_pruner(self.space["pruner"], *self._pruner_args()),
            load_if_exists=True,
        )
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.enqueue_trial(trial.params, skip_if_exists=False)  # cut off by an interruption: run it again
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        return study

    def _pruner_args(self) -> tuple[int, int]:
        return int(self.space.get("warmup_epochs", 1)), int(self.space.get("startup_trials", 3))

    def trial_configs(self, number: int, params: dict, fold: int | None = None) -> tuple[dict, dict]:
        """``(clean, run)``: the experiment with the trial's parameters (what ``best.yaml`` is), and the same pointed
        at the trial's folder and W&B group, for the run."""
        clean = with_overrides(self.base, decoded(self.space["space"], params))
        version = f"trial_{number:03d}" + (f"_fold{fold}" if fold is not None else "")
        run = point_loggers(clean, self.out, "trials", version, f"sweep-{self.exp}", f"{self.exp}-{version}")
        return clean, run

    def run_trial(self, study, trial) -> None:
        import optuna

        folder = self.out / "trials" / f"trial_{trial.number:03d}"
        folds = list(range(self.cv)) if self.cv else [None]
        values, pruned = [], False
        for fold in folds:
            clean, run = self.trial_configs(trial.number, trial.params, fold)
            # trial.yaml, not config.yaml: a folder holding a config.yaml is a used run, which train.py never reuses
            write_config(clean, folder / "trial.yaml", f"trial {trial.number} of sweep {self.exp}: {trial.params}")
            run_yaml = write_config(run, folder / f"run{'' if fold is None else f'_fold{fold}'}.yaml")
            status = folder / "status.json"
            status.unlink(missing_ok=True)
            pruning = {
                "class_path": "callbacks.sweep.OptunaPruning",
                "init_args": {
                    "storage": self.storage,
                    "study_name": self.exp,
                    "trial_number": trial.number,
                    "monitor": self.space["metric"],
                    "pruner": self.space["pruner"],
                    "warmup_epochs": self._pruner_args()[0],
                    "startup_trials": self._pruner_args()[1],
                    "step_offset": (fold or 0) * self.max_epochs,
                    "status_file": str(status),
                },
            }
            args = ["--test_after_fit=false", f"--trainer.callbacks+={json.dumps(pruning)}", *self.extra]
            if fold is not None:
                args += [f"--data.init_args.num_folds={self.cv}", f"--data.init_args.fold={fold}"]
            log = folder / f"train{'' if fold is None else f'_fold{fold}'}.log"
            code = run_training(run_yaml, args, log)
            run_dir = self.out / "trials" / run["trainer"]["logger"][0]["init_args"]["version"]
            value = best_value(metric_by_epoch(run_dir, self.space["metric"]), self.space["direction"])
            if code != 0 or value is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                why = tail(log) if code != 0 else f"exit 0 but no {self.space['metric']} in {run_dir / 'metrics.csv'}"
                print(f"trial {trial.number}: failed ({why}); log: {log}", flush=True)
                return False
            values.append(value)
            if status.is_file() and json.loads(status.read_text()).get("pruned"):
                pruned = True
                break
        objective = sum(values) / len(values)
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            print(f"trial {trial.number}: pruned ({self.space['metric']} {objective:.4f}) {trial.params}", flush=True)
        else:
            study.tell(trial, objective)
            print(f"trial {trial.number}: {self.space['metric']} {objective:.4f} {trial.params}", flush=True)
        return True

    def run(self, trials: int, fresh: bool = False):
        import optuna

        study = self.study(fresh)
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        failed_in_a_row = 0
        while len(study.get_trials(deepcopy=False, states=finished)) < trials:
            trial = study.ask(self.distributions)
            failed_in_a_row = 0 if self.run_trial(study, trial) else failed_in_a_row + 1
            if failed_in_a_row >= MAX_FAILED_IN_A_ROW:  # a broken setup, not a bad draw: stop instead of looping
                log = self.out / "trials" / f"trial_{trial.number:03d}"
                raise RuntimeError(f"{failed_in_a_row} trials in a row failed; the last one's log is under {log}")
        return study


def _has_csv(run: dict) -> bool:
    loggers = run.get("trainer", {}).get("logger")
    first = loggers[0] if isinstance(loggers, list) and loggers else loggers
    return isinstance(first, dict) and str(first.get("class_path", "")).endswith(("CSVLogger", "TensorBoardLogger"))


def report(sweep: Sweep, study) -> Path:
    """``results.md``, ``trials.csv``, ``search.png``, ``best.yaml`` (and the same to W&B); returns ``best.yaml``."""
    import optuna

    trials = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.RUNNING]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"no trial of {sweep.out} completed: see the logs under {sweep.out / 'trials'}")
    keys = list(sweep.distributions)
    rows = [
        {"trial": t.number, "state": t.state.name.lower(), sweep.space["metric"]: t.value, "epochs": _epochs(t)}
        | {k: t.params.get(k) for k in keys}
        for t in trials
    ]
    importances = {}
    if len(complete) >= 2:
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as err:  # every trial with the same value: no importance to measure
            print(f"no parameter importances: {err}")
    best = study.best_trial
    best_yaml = sweep.out / "best.yaml"
    clean, _ = sweep.trial_configs(best.number, best.params)
    header = (
        f"The best of {len(trials)} trials of `make sweep` on {sweep.config_path} (trial {best.number}):\n"
        f"{sweep.space['metric']} {best.value:.4f} ({sweep.space['direction']}). Run it: "
        f"make train CONFIG={best_yaml}"
    )
    write_config(clean, best_yaml, header)
    _write_table(sweep, rows, importances, best)
    plot = _plot(sweep, trials, importances)
    _to_wandb(sweep, rows, plot)
    return best_yaml


def _epochs(trial) -> int:
    return len(trial.intermediate_values)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _write_table(sweep: Sweep, rows: list[dict], importances: dict, best) -> None:
    import csv

    with (sweep.out / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Sweep of {sweep.config_path} ({len(rows)} trials)", ""]
    lines += [f"Objective: {sweep.space['metric']} ({sweep.space['direction']}, best epoch of each trial"]
    lines[-1] += f"{', mean over ' + str(sweep.cv) + ' folds' if sweep.cv else ''}); pruner: {sweep.space['pruner']}."
    lines += ["", f"Best: trial {best.number}, {best.value:.4f}, {best.params}", ""]
    columns = list(rows[0])
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in rows]
    if importances:
        lines += ["", "Parameter importance (fANOVA):", "", "| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in importances.items()]
    (sweep.out / "results.md").write_text("\n".join(lines) + "\n")


def _plot(sweep: Sweep, trials: list, importances: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    better = max if sweep.space["direction"] == "maximize" else min
    best_so_far, running = [], None
    for t in trials:
        if t.value is not None and t.state.name == "COMPLETE":
            running = t.value if running is None else better(running, t.value)
        best_so_far.append(running)
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        points = [(t.number, t.value or _last(t)) for t in trials if t.state.name == state]
        points = [p for p in points if p[1] is not None]
        if points:
            axes[0].scatter(*zip(*points, strict=True), marker=marker, label=state.lower())
    axes[0].plot([t.number for t in trials], best_so_far, color="black", label="best so far")
    axes[0].set(xlabel="trial", ylabel=sweep.space["metric"], title="search")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    if importances:
        names = list(importances)[::-1]
        axes[1].barh([n.replace(".init_args", "") for n in names], [importances[n] for n in names])
    axes[1].set(title="parameter importance", xlabel="fANOVA importance")
    figure.tight_layout()
    path = sweep.out / "search.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _last(trial) -> float | None:
    values = trial.intermediate_values
    return values[max(values)] if values else None


def _to_wandb(sweep: Sweep, rows: list[dict], plot: Path) -> None:
    from callbacks.tracking import WandbLogger

    logger = WandbLogger(name=f"{sweep.exp}-sweep", group=f"sweep-{sweep.exp}", save_dir=str(sweep.out), tags=["sweep"])
    columns = list(rows[0])
    logger.log_table("sweep/trials", columns, [[_fmt(r[c]) for c in columns] for r in rows])
    logger.log_image("sweep/search", [str(plot)])
    logger.experiment.finish()


def confirm(sweep: Sweep, best_yaml: Path, seeds: list[int]) -> str:
    """The best configuration and the experiment as shipped, each over ``seeds``, tested on the test split (which the
    search never saw): a table of every test metric, mean ± sd, appended to ``results.md``."""
    import statistics

    arms = {"default": sweep.base, "best": load_config(best_yaml)}
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm, config in arms.items():
            version = f"{arm}_seed{seed}"
            run = point_loggers(config, sweep.out, "confirm", version, f"sweep-{sweep.exp}", f"{sweep.exp}-{version}")
            path = write_config(run, sweep.out / "confirm" / "configs" / f"{version}.yaml")
            result_file = sweep.out / "confirm" / version / "results.json"
            log = sweep.out / "confirm" / "logs" / f"{version}.log"
            if run_training(path, [f"--seed_everything={seed}", f"--results_file={result_file}", *sweep.extra], log):
                raise RuntimeError(f"confirmation run {version} failed ({tail(log)}); log: {log}")
            results[arm].append(json.loads(result_file.read_text())["test"])
            print(f"confirm {version}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(results[arm][-1].items())))
    metrics = sorted(k for k in results["best"][0] if not k.rsplit("/", 1)[-1].startswith(("f1_", "acc_")))
    lines = [f"## Best vs default on the test split, seeds {seeds}", "", "| arm | " + " | ".join(metrics) + " |"]
    lines.append("|---|" + "---|" * len(metrics))
    for arm, runs in results.items():
        cells = []
        for key in metrics:
            values = [r[key] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.4f} ± {sd:.4f} ({' / '.join(f'{v:.4f}' for v in values)})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (sweep.out / "confirm.json").write_text(json.dumps({"seeds": seeds, "test": results}, indent=1))
    with (sweep.out / "results.md").open("a") as f:
        f.write("\n" + table)
    return table


def wandb_sweep(sweep: Sweep) -> Path:
    """The search space as a W&B sweep config whose agent runs each trial through this script."""
    parameters = {}
    for key, spec in sweep.space["space"].items():
        if "categorical" in spec:
            parameters[key] = {"values": spec["categorical"]}
            continue
        low, high = spec.get("float") or spec.get("int")
        kind = "int_uniform" if "int" in spec else "uniform"
        if spec.get("log"):
            kind = "q_log_uniform_values" if "int" in spec else "log_uniform_values"
        parameters[key] = {"distribution": kind, "min": low, "max": high}
    goal = sweep.space["direction"].removesuffix("imize") + "imize"
    config = {
        "program": "scripts/sweep.py",
        "method": "bayes",
        "metric": {"name": sweep.space["metric"], "goal": goal},
        "parameters": parameters,
        "command": ["${env}", "${interpreter}", "scripts/sweep.py", "--config", str(sweep.config_path), "--wandb-trial"]
        + ["${args}"],
    }
    path = sweep.out / "wandb_sweep.yaml"
    sweep.out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def wandb_trial(config: Path, pairs: list[str], extra: list[str]) -> int:
    """One run with ``--key=value`` overrides from a W&B agent (``wandb agent`` sets the run and sweep ids)."""
    overrides = {}
    for pair in pairs:
        key, _, value = pair.removeprefix("--").partition("=")
        overrides[key] = yaml.safe_load(value)
    base = load_config(config)
    folder = Path("runs") / "sweeps" / config.stem / "wandb"
    path = write_config(with_overrides(base, overrides), folder / "trial.yaml")
    return run_training(path, extra, folder / "trial.log")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the experiment YAML")
    parser.add_argument("--space", help="the search space YAML (default: configs/sweeps/<exp>.yaml)")
    parser.add_argument("--trials", type=int, default=12, help="trials to finish (completed or pruned)")
    parser.add_argument("--out", help="the sweep folder (default: runs/sweeps/<exp>)")
    parser.add_argument("--cv", type=int, default=0, help="objective = mean over this many folds (0: no folds)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    parser.add_argument("--fresh", action="store_true", help="start the study over instead of resuming it")
    parser.add_argument(
        "--backend", "--sweep", choices=("optuna", "wandb"), default="optuna", help="wandb: write a W&B sweep config"
    )
    parser.add_argument(
        "--confirm",
        type=int,
        nargs="*",
        default=[],
        help="after the search, run the best config and the experiment as shipped over these seeds on the test split",
    )
    parser.add_argument("--wandb-trial", action="store_true", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args(argv)
    config = Path(args.config)
    if args.wandb_trial:
        pairs = [a for a in extra if a.startswith("--") and "=" in a]  # W&B's ${args}: every one an override
        raise SystemExit(wandb_trial(config, pairs, [a for a in extra if a not in pairs]))
    space = Path(args.space) if args.space else config.parent / "sweeps" / config.name
    sweep = Sweep(config, space, Path(args.out or f"runs/sweeps/{config.stem}"), args.cv, args.seed, extra)
    if args.backend == "wandb":
        path = wandb_sweep(sweep)
        print(f"W&B sweep config: {path}\n  wandb sweep {path}\n  wandb agent <entity>/<project>/<sweep id>")
        return
    if args.fresh and (sweep.out / "trials").exists():
        shutil.rmtree(sweep.out / "trials")
    study = sweep.run(args.trials, args.fresh)
    best = report(sweep, study)
    if args.confirm:
        confirm(sweep, best, args.confirm)
    print(f"\n{(sweep.out / 'results.md').read_text()}\nbest config: {best}\n  make train CONFIG={best}")


if __name__ == "__main__":
    from scripts.train import run_cli

    run_cli(main)
