"""Framework overhead: a training epoch through our LightningModule and Trainer (the template's LR schedule callback,
CSV logging, train accuracy) vs a plain PyTorch loop doing the same work (same module, loader, optimizer groups and
LR schedule). Epochs are interleaved so drift hits both sides; the first pair warms up. Goal: at least 0.97 of the
plain loop's samples/s."""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from callbacks.lr_schedule import LRSchedule, lr_factor
from callbacks.unfreezing import NoFreeze
from datamodules.digits import DigitsDataModule
from modules.image_classifier import ImageClassifier
from scripts.benchmarks.harness import DEVICE, SCALE, Context, TrainTimer, default_model, digits, quiet_trainer, sync


def _lightning_epoch(model: ImageClassifier, data: DigitsDataModule, tmp: Path) -> tuple[int, float]:
    timer = TrainTimer()
    trainer = quiet_trainer(
        logger=CSVLogger(tmp, name="overhead"),
        log_every_n_steps=10,
        callbacks=[NoFreeze(), LRSchedule("cosine", warmup=0.1), timer],
    )
    trainer.fit(model, data)
    return timer.samples, timer.seconds


def _plain_epoch(model: ImageClassifier, loader: DataLoader) -> tuple[int, float]:
    """What a practitioner writes by hand: the same module, optimizer groups, loss and LR schedule."""
    model.train()
    optimizer = model.configure_optimizers()
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]
    total = len(loader)
    warmup = round(0.1 * total)
    samples = 0
    sync()
    start = time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        images, labels = images.to(DEVICE, non_blocking=True), labels.to(DEVICE, non_blocking=True)
        factor = lr_factor(step, total, warmup, "cosine")
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        samples += len(labels)
    sync()
    return samples, time.perf_counter() - start


def run(context: Context) -> dict:
    """Training samples/s through Lightning vs a plain loop, ``config.reps`` timed epochs each."""
    config = context.config
    reps, backbone, image_size = config.reps, config.backbone, config.image_size
    torch.manual_seed(0)
    data = digits(config)
    lightning_model = default_model(config)
    plain_model = copy.deepcopy(lightning_model).to(DEVICE)
    loader = data.train_dataloader()
    lightning_epochs, plain_epochs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(reps + 1):
            lightning_epochs.append(_lightning_epoch(lightning_model, data, Path(tmp)))
            plain_epochs.append(_plain_epoch(plain_model, loader))
    lightning = [n / s for n, s in lightning_epochs[1:]]
    plain = [n / s for n, s in plain_epochs[1:]]
    ratio = statistics.median(lightning) / statistics.median(plain)
    return {
        "title": "Framework overhead: a training epoch through the template vs a plain PyTorch loop",
        "setup": f"{backbone} on {image_size} px digits, batch {64 * SCALE}, AdamW, cosine LR, fp32; "
        f"{reps} timed epochs each",
        "columns": ["side", "samples/s (median)", "all epochs"],
        "rows": [
            ["template (LightningModule + Trainer)", statistics.median(lightning), lightning],
            ["plain PyTorch loop", statistics.median(plain), plain],
        ],
        "ratio": {"template / plain loop": ratio},
        "goal": "template >= 0.97 x the plain loop's samples/s",
        "goal_met": ratio >= 0.97,
        "samples_per_s": {"template": statistics.median(lightning), "plain": statistics.median(plain)},
        "samples_per_epoch": {"template": lightning_epochs[-1][0], "plain": plain_epochs[-1][0]},
    }
