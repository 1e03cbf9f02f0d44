"""K-fold cross-validation: ``make cv EXP=<exp> FOLDS=K [ARGS=...]``.

    python scripts/cv.py --config configs/digits.yaml --folds 5

Each fold is a fresh run of ``scripts/train.py`` in its own process (nothing carries over from one fold to the next),
with ``--data.init_args.num_folds K --data.init_args.fold i``: the data module cuts the data it trains and validates
on (never its test split) into K folds, stratified by label (by article for SQuAD), and validates on fold ``i``. The
runs write to ``<out>/folds/fold_i`` and join the W&B group ``cv-<exp>``.

At the end, ``<out>/results.md`` and ``results.json``: every metric of every fold (the best validation value, and
the test metrics of the checkpoint chosen on the fold) with mean ± sd over the folds, and ``<out>/oof.csv``: the
out-of-fold predictions of every validation sample (the last weights of the fold's run, which nothing was chosen on),
with their accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from scripts.experiments import load_config, point_loggers, run_training, tail, write_config


def run_folds(config_path: Path, folds: int, out: Path, extra: list[str]) -> list[dict]:
    """Run every fold; returns one ``{"fold", "best_<monitor>", "test/...": value}`` row per fold."""
    base, exp = load_config(config_path), config_path.stem
    rows = []
    for fold in range(folds):
        folder = out / "folds" / f"fold_{fold}"
        run = point_loggers(base, out, "folds", f"fold_{fold}", f"cv-{exp}", f"{exp}-fold{fold}")
        run_yaml = write_config(run, out / "configs" / f"fold_{fold}.yaml", f"fold {fold} of {folds}: {config_path}")
        args = [
            f"--data.init_args.num_folds={folds}",
            f"--data.init_args.fold={fold}",
            f"--results_file={folder / 'results.json'}",
            f"--oof_file={folder / 'oof.csv'}",
            *extra,
        ]
        log = out / "logs" / f"fold_{fold}.log"
        code = run_training(run_yaml, args, log)
        if code != 0:
            raise RuntimeError(f"fold {fold} failed ({tail(log)}); log: {log}")
        results = json.loads((folder / "results.json").read_text())
        best = {k: v for k, v in results.items() if k.startswith("best_") and isinstance(v, float | int)}
        rows.append({"fold": fold} | best | results.get("test", {}))
        shown = ", ".join(f"{k} {v:.4f}" for k, v in rows[-1].items() if k != "fold")
        print(f"fold {fold}: {shown}", flush=True)
    return rows


def merge_oof(out: Path, folds: int) -> tuple[Path, float | None]:
    """Every fold's out-of-fold predictions in one CSV, and their accuracy (None when the model writes none)."""
    merged, right = [], 0
    for fold in range(folds):
        path = out / "folds" / f"fold_{fold}" / "oof.csv"
        if not path.is_file():
            return out / "oof.csv", None
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                merged.append(row)
                right += row["label"] == row["pred"]
    if not merged:
        return out / "oof.csv", None
    with (out / "oof.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(merged[0]))
        writer.writeheader()
        writer.writerows(merged)
    return out / "oof.csv", right / len(merged)


def summary(rows: list[dict], oof_accuracy: float | None, config: Path) -> tuple[str, dict]:
    """The markdown table (every metric per fold, mean ± sd) and the same as a dict."""
    metrics = [k for k in rows[0] if k != "fold"]
    stats = {}
    for key in metrics:
        values = [r[key] for r in rows if key in r]
        stats[key] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    lines = [f"# {len(rows)}-fold cross-validation of {config}", ""]
    lines += ["| fold | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    lines += [f"| {r['fold']} | " + " | ".join(f"{r.get(k, float('nan')):.4f}" for k in metrics) + " |" for r in rows]
    lines += ["| mean ± sd | " + " | ".join(f"{stats[k]['mean']:.4f} ± {stats[k]['sd']:.4f}" for k in metrics) + " |"]
    if oof_accuracy is not None:
        lines += ["", f"Out-of-fold accuracy (every sample predicted by the run that did not train on it): "
                  f"{oof_accuracy:.4f}"]  # fmt: skip
    return "\n".join(lines) + "\n", {"folds": rows, "summary": stats, "oof_accuracy": oof_accuracy}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the experiment YAML")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (K)")
    parser.add_argument("--out", help="the folder of the CV runs and tables (default: runs/cv/<exp>)")
    args, extra = parser.parse_known_args(argv)
    if args.folds < 2:
        raise ValueError(f"--folds is {args.folds}: cross-validation needs at least 2 folds")
    config = Path(args.config)
    out = Path(args.out or f"runs/cv/{config.stem}")
    rows = run_folds(config, args.folds, out, extra)
    oof_path, oof_accuracy = merge_oof(out, args.folds)
    table, record = summary(rows, oof_accuracy, config)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(record, indent=1))
    print("\n" + table + (f"out-of-fold predictions: {oof_path}" if oof_accuracy is not None else ""))


if __name__ == "__main__":
    from scripts.train import run_cli

    run_cli(main)
