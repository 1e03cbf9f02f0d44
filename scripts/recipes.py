"""Do the default recipes transfer better than a naive fine-tune? Each task's experiment, run three ways on the same
data, budget (epochs) and seeds, with one table per task: mean ± sd of the test metric over the seeds.

    python scripts/recipes.py [--tasks sst2 agnews squad ants_bees digits] [--seeds 0 1 2]
        [--arms naive default scratch] [--data-root ../shared/data] [--out runs/recipes] [-- extra CLI arguments]
    make recipes [TASKS="sst2 squad"] [SEEDS="0 1 2"]

Arms:
    naive: the loop a practitioner writes in ten minutes, in plain PyTorch (``scripts/naive.py``): every weight
        trainable, AdamW at a fixed LR, fixed-length padding, the last weights tested.
    default: the experiment's YAML as shipped (``make train EXP=...`` with the task's quick-budget arguments).
    scratch: the same YAML with random weights (``--model.pretrained false``): what pre-training is worth.
    lora: the same YAML with ``configs/presets/lora.yaml`` (LoRA adapters, the encoder frozen); not in the default
        arms: ``--arms default lora``.

No arm chooses anything on the test split: the template tests its best-on-validation checkpoint only when the
validation data is not the test data, else its last weights (``scripts/train.py``); the naive arm tests its last.
Tasks whose data is missing under ``--data-root`` are skipped with a note. Results: ``<out>/results.md`` and
``<out>/results.json``; each template run is an ordinary run under ``<out>/<task>/<arm>/seed<N>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scripts import naive
from scripts.compare import loggers, summarize
from scripts.train import main as train


@dataclass
class Task:
    """One row of the recipes table: an experiment, its data folder, its quick budget and its goal."""

    config: str
    naive: callable
    metric: str = "test/acc"
    data: str | None = None  # folder under --data-root, passed as --data.data_dir; None: data shipped by a package
    args: list[str] = field(default_factory=list)
    goal: str = ""


TASKS = {
    "sst2": Task(
        "configs/text_sst2.yaml",
        naive.text,
        data="sst2",
        args=["--data.max_train_samples", "2000", "--trainer.max_epochs", "1"],
        goal="mean >= 0.85 with sd <= 0.01",
    ),
    "agnews": Task(
        "configs/text_agnews.yaml",
        naive.text,
        data="agnews",
        args=["--data.max_train_samples", "2000", "--trainer.max_epochs", "1"],
        goal="mean >= 0.89",
    ),
    "squad": Task(
        "configs/squad.yaml",
        naive.qa,
        "test/f1",
        data="squad",
        args=["--data.answerable_only", "true"],  # train on 3 articles, test on Sky_(United_Kingdom)
        goal="F1 >= naive + 8 at <= naive's time",
    ),
    "ants_bees": Task("configs/ants_bees.yaml", naive.image, data="hymenoptera", goal="mean >= 0.93"),
    "digits": Task("configs/digits.yaml", naive.image, goal="mean >= 0.98"),
}
ARMS = ("naive", "default", "scratch")
EXTRA_ARMS = {"lora": ["--config", "configs/presets/lora.yaml"]}  # arm -> what it adds after the experiment


def goal_met(task: str, rows: dict[str, dict]) -> bool | None:
    """Whether the default arm meets the task's goal (None when an arm the goal needs did not run)."""
    default = rows.get("default")
    if default is None:
        return None
    if task == "sst2":
        return default["mean"] >= 0.85 and default["std"] <= 0.01
    if task == "agnews":
        return default["mean"] >= 0.89
    if task == "squad":
        base = rows.get("naive")
        return None if base is None else default["mean"] >= base["mean"] + 8 and default["wall_s"] <= base["wall_s"]
    return default["mean"] >= {"ants_bees": 0.93, "digits": 0.98}[task]


def run_arm(task: Task, name: str, arm: str, seed: int, base_args: list[str], out: Path) -> dict:
    """One run of one arm; returns ``{"arm", "seed", "test": {metric: value}, "wall_s"}``."""
    args = ["--config", task.config, *base_args, "--seed_everything", str(seed)]
    if arm == "naive":
        cli = train(args, run=False)  # the experiment's own data module and budget
        cli.datamodule.setup("fit")
        result = task.naive(cli.datamodule, seed=seed, epochs=cli.trainer.max_epochs)
        wall = result.pop("wall_s")
        return {"arm": arm, "seed": seed, "test": result, "wall_s": wall}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(loggers(out / name, f"recipes_{name}", arm, seed), f)
    extra = ["--model.pretrained", "false"] if arm == "scratch" else []
    preset = EXTRA_ARMS.get(arm, [])
    try:
        cli = train(["fit", "--config", task.config, *preset, "--config", f.name, *args[2:], *extra])
    finally:
        Path(f.name).unlink()
    callback = cli.trainer.checkpoint_callback
    ckpt = Path(callback.last_model_path or callback.best_model_path) if callback else None
    size = ckpt.stat().st_size / 2**20 if ckpt and ckpt.is_file() else None
    return {"arm": arm, "seed": seed, "test": cli.results["test"], "wall_s": cli.results["wall_s"], "ckpt_mb": size}


def task_table(name: str, rows: list[dict], metric: str, goal: str, met: bool | None) -> str:
    scale = 100 if metric.endswith("acc") else 1  # accuracy in %, EM/F1 are already 0-100
    lines = [
        f"### {name}: {metric}",
        "",
        "| arm | mean ± sd | per seed | fit s/run |",
        "|---|---|---|---|",
    ]
    for r in rows:
        values = " / ".join(f"{v * scale:.1f}" for v in r["values"])
        lines.append(
            f"| {r['arm']} | {r['mean'] * scale:.1f} ± {r['std'] * scale:.1f} | {values} | {r['wall_s']:.0f} |"
        )
    verdict = {True: "met", False: "**MISSED**", None: "not judged (an arm is missing)"}[met]
    return "\n".join([*lines, "", f"goal for the default: {goal}: {verdict}", ""])


def recipes(
    tasks: list[str], seeds: list[int], arms: list[str], data_root: Path, out: Path, extra: list[str] | None = None
) -> dict:
    """Run every arm of every task over the seeds; write and return the tables."""
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"seeds": seeds, "arms": arms, "extra": extra or [], "tasks": {}}
    sections = [
        f"# Recipes vs a naive fine-tune\n\nseeds {seeds}; extra arguments: `{' '.join(extra or []) or 'none'}`\n"
    ]
    for name in tasks:
        task = TASKS[name]
        base_args = list(task.args)
        if task.data:
            folder = data_root / task.data
            if not folder.is_dir():
                print(f"[recipes] {name}: skipped, no data at {folder}", flush=True)
                sections.append(f"### {name}\n\nskipped: no data at `{folder}`\n")
                continue
            base_args = ["--data.data_dir", str(folder), *base_args]
        base_args += extra or []
        runs = []
        for seed in seeds:
            for arm in arms:
                run = run_arm(task, name, arm, seed, base_args, out)
                runs.append(run)
                print(f"[recipes] {name} {arm} seed {seed}: {task.metric} {run['test'][task.metric]:.4f}", flush=True)
        rows = summarize(runs, task.metric)
        met = goal_met(name, {r["arm"]: r for r in rows})
        sections.append(task_table(name, rows, task.metric, task.goal, met))
        report["tasks"][name] = {"config": task.config, "metric": task.metric, "goal": task.goal, "met": met}
        report["tasks"][name] |= {"arms": rows, "runs": runs}
        (out / "results.md").write_text("\n".join(sections))  # after every task: a long run is readable midway
        (out / "results.json").write_text(json.dumps(report, indent=1))
        print("\n" + sections[-1], flush=True)
    print(f"written to {out / 'results.md'}", flush=True)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=[*ARMS, *EXTRA_ARMS])
    parser.add_argument("--data-root", default="../shared/data", help="folder holding sst2/, agnews/, squad/, ...")
    parser.add_argument("--out", default="runs/recipes")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    return recipes(args.tasks, args.seeds, args.arms, Path(args.data_root), Path(args.out), extra)


if __name__ == "__main__":
    main(sys.argv[1:])
