"""LP-FT: fit the new head on the frozen backbone's features before fine-tuning starts (Kumar et al., 2022, "Fine-Tuning
can Distort Pretrained Features and Underperform Out-of-Distribution").

A randomly initialised head sends large, random gradients into the pretrained backbone during the first steps, which
distorts the features before the head has learned anything; with short budgets the run then spends its few steps
repairing that damage, and the result varies a lot with the seed. Fitting the head first (a linear probe: multinomial
logistic regression on the features, solved to convergence with L-BFGS) removes both problems at the cost of one
forward pass over the training data without gradients (about a third of a training epoch).

The probe runs once, at the start of ``fit``, before the first optimizer step, in eval mode (no dropout, BatchNorm
statistics untouched) and without gradients; a resumed run (``global_step > 0``) finds the head in its checkpoint and
skips it. Under DDP every process probes its share of the data, the features are gathered and every process solves
the same problem, so the heads stay identical.

The LightningModule needs ``features(inputs) -> (B, D)``, a ``head`` whose last module is the ``nn.Linear`` to fit,
and ``split_batch(batch) -> (inputs, labels)`` (``modules.classifier.Classifier`` has all three).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn


def fit_linear(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_outputs: int,
    l2: float = 1e-3,
    max_iter: int = 100,
    multi_label: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``(C, D)`` and bias ``(C,)`` of an L2-regularised logistic regression, fitted with L-BFGS.

    Args:
        features: ``(N, D)`` inputs.
        labels: ``(N,)`` class indices, or ``(N, C)`` 0/1 targets when ``multi_label``.
        num_outputs: number of classes ``C``.
        l2: weight of ``||W||^2 / 2`` added to the mean loss.
        max_iter: L-BFGS iterations.
        multi_label: one sigmoid per class (binary cross-entropy) instead of a softmax.
    """
    features = features.float()
    weight = torch.zeros(num_outputs, features.shape[1], requires_grad=True)
    bias = torch.zeros(num_outputs, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = features @ weight.T + bias
        loss = (
            F.binary_cross_entropy_with_logits(logits, labels.float())
            if multi_label
            else F.cross_entropy(logits, labels)
        )
        loss = loss + l2 / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


class LinearProbe(Callback):
    """Fit the head's final linear layer on frozen features before fine-tuning (LP-FT; see the module docstring).

    Args:
        l2: L2 penalty of the probe's weights (larger: smaller logits at the start of fine-tuning).
        max_iter: L-BFGS iterations of the probe.
        max_batches: probe on at most this many training batches (None: the whole training set).
    """

    def __init__(self, l2: float = 1e-3, max_iter: int = 100, max_batches: int | None = None):
        if l2 < 0 or max_iter < 1:
            raise ValueError(f"LinearProbe needs l2 >= 0 and max_iter >= 1, got {l2} and {max_iter}")
        self.l2, self.max_iter, self.max_batches = l2, max_iter, max_batches

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step > 0:
            return  # resumed: the probed and fine-tuned head is in the checkpoint
        linear = _final_linear(pl_module)
        features, labels = self._collect(trainer, pl_module)
        features = trainer.strategy.all_gather(features).reshape(-1, features.shape[-1])
        labels = trainer.strategy.all_gather(labels).reshape(-1, *labels.shape[1:])
        multi_label = bool(getattr(pl_module, "multi_label", False))
        weight, bias = fit_linear(
            features.cpu(), labels.cpu(), linear.out_features, self.l2, self.max_iter, multi_label
        )
        with torch.no_grad():
            linear.weight.copy_(weight.to(linear.weight))
            linear.bias.copy_(bias.to(linear.bias))
        with torch.no_grad():
            logits = features.float().cpu() @ weight.T + bias
            fit = (logits.argmax(-1) == labels.cpu()).float().mean().item() if not multi_label else float("nan")
        rank_zero_info(f"LinearProbe: head fitted on {len(features)} training samples (train accuracy {fit:.3f})")

    def _collect(self, trainer: Trainer, pl_module: LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = pl_module.training
        pl_module.eval()
        features, labels = [], []
        limit = trainer.num_training_batches  # honours limit_train_batches and fast_dev_run
        if self.max_batches is not None:
            limit = min(limit, self.max_batches)
        with torch.no_grad():
            for i, batch in enumerate(trainer.train_dataloader):
                if i >= limit:
                    break
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                inputs, target = pl_module.split_batch(batch)
                features.append(pl_module.features(inputs).float())
                labels.append(target)
        pl_module.train(was_training)
        return torch.cat(features), torch.cat(labels)


def _final_linear(pl_module: LightningModule) -> nn.Linear:
    head = getattr(pl_module, "head", None)
    last = list(head.children())[-1] if isinstance(head, nn.Sequential) else head
    hidden = isinstance(head, nn.Sequential) and any(isinstance(m, nn.Linear) for m in list(head.children())[:-1])
    if not isinstance(last, nn.Linear) or hidden or not hasattr(pl_module, "features"):
        raise ValueError(
            "LinearProbe fits a linear head on features: the module needs features(inputs) and a head that is one "
            "nn.Linear (after dropout); remove LinearProbe or model.hidden_dim"
        )
    return last
