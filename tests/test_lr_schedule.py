"""LRSchedule: the LR of every named group at each optimizer step is its peak times the schedule's factor."""

from __future__ import annotations

import math

import pytest
import torch
from lightning import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from callbacks.lr_schedule import LRSchedule, lr_factor


def test_warmup_then_cosine_formula() -> None:
    total, warmup = 20, 4
    assert [lr_factor(s, total, warmup) for s in range(4)] == [1 / 5, 2 / 5, 3 / 5, 4 / 5]
    assert lr_factor(4, total, warmup) == pytest.approx(1.0)
    assert lr_factor(19, total, warmup) == pytest.approx(0.0)
    mid = 4 + (19 - 4) / 2
    assert lr_factor(int(mid), total, warmup) == pytest.approx((1 + math.cos(math.pi * (int(mid) - 4) / 15)) / 2)


def test_linear_constant_onecycle_and_floor() -> None:
    assert lr_factor(9, 10, 0, "linear") == pytest.approx(0.0)
    assert lr_factor(5, 11, 0, "linear", min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(7, 10, 2, "constant") == 1.0
    assert lr_factor(0, 10, 4, "onecycle") == pytest.approx(1 / 25)
    assert lr_factor(9, 10, 4, "onecycle", min_ratio=0.01) == pytest.approx(0.01)


class _TwoGroups(LightningModule):
    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        self.seen: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append({g["name"]: g["lr"] for g in self.optimizers().optimizer.param_groups})
        return self.head(self.body(batch[0])).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(
            [
                {"name": "head", "params": self.head.parameters(), "lr": 0.1},
                {"name": "backbone.body", "params": self.body.parameters(), "lr": 0.01},
            ]
        )


def _fit(tmp_path, callback, accumulate: int = 1) -> _TwoGroups:
    model = _TwoGroups()
    data = DataLoader(TensorDataset(torch.rand(16, 4)), batch_size=2)
    Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[callback],
        accumulate_grad_batches=accumulate,
    ).fit(model, data)
    return model


def test_each_group_follows_the_schedule_at_its_own_peak(tmp_path) -> None:
    model = _fit(tmp_path, LRSchedule("cosine", warmup=4))
    assert len(model.seen) == 16
    for step, lrs in enumerate(model.seen):
        factor = lr_factor(step, 16, 4, "cosine")
        assert lrs["head"] == pytest.approx(0.1 * factor)
        assert lrs["backbone.body"] == pytest.approx(0.01 * factor)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path) -> None:
    model = _fit(tmp_path, LRSchedule("linear", warmup=0), accumulate=2)
    # 16 batches, 8 optimizer steps: the two micro-batches of one step share its LR.
    expected = [0.1 * lr_factor(i // 2, 8, 0, "linear") for i in range(16)]
    assert [lrs["head"] for lrs in model.seen] == pytest.approx(expected)


def test_warmup_longer_than_the_run_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="warmup is 100 steps but the whole run has only 16"):
        _fit(tmp_path, LRSchedule(warmup=100))


def test_unknown_schedule_is_an_error() -> None:
    with pytest.raises(ValueError, match="'cosin'"):
        LRSchedule("cosin")
