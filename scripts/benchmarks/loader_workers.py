"""Data-loader workers: the same Lightning training epoch with the data module's ``num_workers`` at 0 and at 2 (the
data is in memory; augmentation runs in the workers or in the main process), to check the default of 0."""

from __future__ import annotations

import statistics

import torch

from callbacks.unfreezing import NoFreeze
from scripts.benchmarks.harness import SCALE, Context, TrainTimer, default_model, digits, quiet_trainer


def run(context: Context, timed_epochs: int = 2) -> dict:
    """Lightning training samples/s at num_workers 0 vs 2, median of ``timed_epochs`` after one warm-up epoch."""
    config = context.config
    torch.manual_seed(0)
    results = {}
    for workers in (0, 2):
        data = digits(config, num_workers=workers)
        timer = TrainTimer()
        trainer = quiet_trainer(max_epochs=timed_epochs + 1, callbacks=[NoFreeze(), timer])
        trainer.fit(default_model(config), data)
        results[workers] = statistics.median(timer.epochs[1:])
    samples = len(data.train_set)
    rows = [[f"num_workers={w}", samples / s] for w, s in results.items()]
    ratio = results[0] / results[2]  # seconds: > 1 means 2 workers are faster
    return {
        "title": "Data-loader workers on the default data (in memory, augmented per sample)",
        "setup": f"{config.backbone}, {config.image_size} px digits, batch {64 * SCALE}; "
        f"median of {timed_epochs} epochs after one warm-up",
        "columns": ["loader", "samples/s"],
        "rows": rows,
        "ratio": {"2 workers / 0 workers speed": ratio},
        "note": "the data modules default to num_workers=0 for in-memory data"
        + (" (kept: workers are not faster here)" if ratio < 1.05 else " (2 workers measured faster here)"),
    }
