"""Frozen backbone vs full fine-tuning: step time and the activation memory autograd saves for one training step,
with the backbone frozen by the engine vs fully trained. Goal: a frozen step costs at most half of a full one."""

from __future__ import annotations

import statistics

import torch

from callbacks.unfreezing import Freeze, NoFreeze
from datamodules.digits import DigitsDataModule
from modules.image_classifier import ImageClassifier
from scripts.benchmarks.harness import CUDA, SCALE, Context, StepCost, quiet_trainer


def run(context: Context, steps: int = 8) -> dict:
    """Median step time and peak saved activations over ``steps`` timed steps, same model and batches both ways."""
    config = context.config
    batch_size = 64 * SCALE
    results = {}
    for name, strategy in (("full", NoFreeze()), ("frozen", Freeze())):
        torch.manual_seed(0)
        model = ImageClassifier(config.backbone, num_classes=10)
        data = DigitsDataModule(image_size=config.image_size, batch_size=batch_size, augment="none", **config.digits)
        cost = StepCost()
        trainer = quiet_trainer(limit_train_batches=steps + cost.warmup, callbacks=[strategy, cost])
        trainer.fit(model, data)
        results[name] = {
            "step_s": statistics.median(cost.times),
            "saved_activations_mb": max(cost.saved) / 2**20,
            **({"cuda_peak_mb": cost.cuda_peak / 2**20} if CUDA else {}),
        }
    time_ratio = results["frozen"]["step_s"] / results["full"]["step_s"]
    memory_ratio = results["frozen"]["saved_activations_mb"] / results["full"]["saved_activations_mb"]
    columns = ["backbone", "step s (median)", "activations saved for backward (MiB)"]
    if CUDA:
        columns.append("CUDA peak (MiB)")
    return {
        "title": "Frozen backbone vs full fine-tuning: one training step",
        "setup": f"{config.backbone}, {config.image_size} px digits, batch {batch_size}, {steps} timed steps",
        "columns": columns,
        "rows": [[name, *r.values()] for name, r in results.items()],
        "ratio": {"frozen / full step time": time_ratio, "frozen / full activation memory": memory_ratio},
        "goal": "a frozen step costs at most half of a full one",
        "goal_met": time_ratio <= 0.5,
        **results,
    }
