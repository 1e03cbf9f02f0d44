"""Predict with a checkpoint on new inputs; the model is rebuilt from the run's saved ``config.yaml``.

    python scripts/predict.py CKPT INPUT [--output predictions.csv]

INPUT by model:
    image classifiers: an image file or a folder of images (searched recursively);
    text classifiers: a .txt file (one text per line) or a CSV/TSV/JSON/JSONL file with the run's text column;
    extractive QA: a JSON file (a SQuAD file, or a list of {"question", "context"} objects).
The output is CSV or JSON by its suffix (default: ``predictions.csv`` in the run directory).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from scripts.from_run import build_datamodule, load_run


def predict(ckpt: str, input_path: str, config: str | None = None) -> list[dict]:
    """Predictions for ``input_path`` (see the module docstring), one dict per input: the task's ``predict_path``
    hook, given the run's data module (rebuilt from its config) for the evaluation preprocessing."""
    model, settings, _ = load_run(ckpt, config)
    source = Path(input_path)
    if not source.exists():
        raise FileNotFoundError(f"input {source} does not exist")
    return model.predict_path(source, build_datamodule(settings))


def write_predictions(rows: list[dict], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
        return out
    flat = []
    for row in rows:  # CSV: one column per class probability
        probs = row.get("probs", {})
        flat.append({k: v for k, v in row.items() if k != "probs"} | {f"p_{k}": v for k, v in probs.items()})
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="checkpoint file of a run (its config.yaml is found beside it)")
    parser.add_argument("input", help="what to predict on (see the module docstring)")
    parser.add_argument("--output", help="CSV or JSON file (default: predictions.csv in the run directory)")
    parser.add_argument("--config", help="the run's config.yaml, when it is not beside the checkpoint")
    args = parser.parse_args(argv)
    rows = predict(args.ckpt, args.input, args.config)
    from scripts.from_run import find_config

    run_dir = Path(args.config).parent if args.config else find_config(Path(args.ckpt)).parent
    out = write_predictions(rows, Path(args.output) if args.output else run_dir / "predictions.csv")
    for row in rows[:5]:
        shown = row.get("answer", row.get("label"))
        print(f"{str(row.get('input', row.get('question', '')))[:60]!r} -> {shown!r} ({row['score']:.3f})")
    print(f"{len(rows)} predictions written to {out}")


if __name__ == "__main__":
    from scripts.train import run_cli

    run_cli(main)
