"""Evaluate a checkpoint on its run's data, rebuilt from the run's saved ``config.yaml`` (no experiment flags).

    python scripts/evaluate.py runs/digits/version_0/checkpoints/last.ckpt [--split val] [--data_dir DIR]

Writes ``eval_<split>/metrics.json`` (and the test plots and CSVs) in the run directory and prints the metrics.
"""

from __future__ import annotations

import argparse
import json

from lightning import Trainer
from lightning.pytorch.loggers import CSVLogger

from callbacks.tracking import RunReport
from scripts.from_run import build_datamodule, load_run


def evaluate(
    ckpt: str, split: str = "test", data_dir: str | None = None, config: str | None = None, limit_batches: float = 1.0
) -> dict:
    """Test (or validate) ``ckpt`` on its run's data; returns the metrics and writes them as JSON in the run dir.

    ``limit_batches``: a share (float) or a number (int) of the split's batches, for a quick look.
    """
    if split not in ("test", "val"):
        raise ValueError(f"split is {split!r}; choose test or val")
    model, settings, run_dir = load_run(ckpt, config)
    datamodule = build_datamodule(settings, **({"data_dir": data_dir} if data_dir else {}))
    out = run_dir / f"eval_{split}"
    trainer = Trainer(
        accelerator="auto",
        devices=1,
        logger=CSVLogger(run_dir, name=f"eval_{split}", version=""),
        callbacks=[RunReport()],
        enable_progress_bar=False,
        limit_test_batches=limit_batches,
        limit_val_batches=limit_batches,
    )
    run = trainer.test if split == "test" else trainer.validate
    metrics = run(model, datamodule=datamodule, verbose=False)[0]
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(ckpt), "split": split, "metrics": metrics}
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    return result | {"written": str(out / "metrics.json")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="checkpoint file of a run (its config.yaml is found beside it)")
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--data_dir", help="the data folder, when it has moved since training")
    parser.add_argument("--config", help="the run's config.yaml, when it is not beside the checkpoint")
    parser.add_argument("--limit_batches", type=float, default=1.0, help="share (<= 1) or number of batches")
    args = parser.parse_args(argv)
    limit = int(args.limit_batches) if args.limit_batches > 1 else args.limit_batches
    result = evaluate(args.ckpt, args.split, args.data_dir, args.config, limit)
    for key, value in sorted(result["metrics"].items()):
        print(f"{key}: {value:.4f}")
    print(f"written: {result['written']}")


if __name__ == "__main__":
    from scripts.train import run_cli

    run_cli(main)
