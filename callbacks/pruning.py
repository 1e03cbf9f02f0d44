"""Magnitude pruning during fine-tuning: the smallest weights of the chosen layers become exact zeros and stay zero.

The schedule, in prose: before ``start_epoch`` nothing is pruned; from the first step of ``start_epoch`` to the first
step of ``end_epoch`` the asked sparsity is reached along the cubic ramp of Zhu & Gupta (2017),
``s = sparsity * (1 - (1 - p) ** 3)`` with ``p`` the fraction of the ramp done, updated every ``every_n_steps``
optimizer steps (fast at first, when there are many redundant weights, then slower); from ``end_epoch`` on the
sparsity is fixed and the remaining weights recover. ``start_epoch == end_epoch`` is one-shot pruning at the start of
that epoch. ``scope="layer"`` prunes the same fraction of every layer; ``scope="global"`` ranks all chosen weights
together, so layers of small weights lose more (and a layer may lose nearly all of them).

Which weights: the ``weight`` of every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` of the model, the task head's only with
``include_head``, filtered by glob patterns on the module path (``layers``, ``exclude``). Biases, norms and
embeddings are never pruned. Frozen weights (a frozen backbone in the first epochs) are pruned too: magnitude pruning
needs no gradient, and a frozen weight set to zero stays zero.

How they stay zero: one boolean mask per weight, kept by this callback. Masks are recomputed from the current
magnitudes at each update, with the already-pruned positions ranked lowest, so a pruned weight never comes back.
Before every optimizer step the gradients at pruned positions are zeroed (so that gradient clipping and the
optimizer's moments ignore them), and right after it (an optimizer step hook) the pruned weights are set to zero
again, because momentum and Adam moments from before the pruning would otherwise move them.

Why not Lightning's ``ModelPruning`` or ``torch.nn.utils.prune``: ``prune`` re-parametrises each ``weight`` into
``weight_orig`` and ``weight_mask`` with a forward pre-hook, so the state-dict keys change (a checkpoint of a pruned run
does not load into the plain model, and export needs ``prune.remove`` first), and ``ModelPruning`` builds on it with
long-standing bugs (Lightning #13643, #8542). Here the weights themselves hold the zeros: checkpoints load into the
plain model and the export (``scripts/export.py``) is sparse by construction. The masks and the sparsity applied are
the callback's checkpoint state, so a resumed run (``ckpt_path``) continues exactly.

Reported: ``prune/sparsity`` (the fraction of the chosen weights that are pruned) is logged every step; at the end of
fit the sparsity reached per layer (counted from the weights' zeros) goes to ``sparsity.csv`` in the run folder and a
short table is printed. The checkpoint callback keeps choosing on its own metric: if the best checkpoint (which the
test after fit uses) was saved before ``end_epoch``, it is less sparse than asked, and a warning says so.
"""

from __future__ import annotations

import csv
import math
from fnmatch import fnmatchcase
from typing import Literal

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn

from callbacks.tracking import run_dir

Scope = Literal["global", "layer"]
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def scheduled_sparsity(step: int, start_step: int, end_step: int, sparsity: float, every_n_steps: int = 1) -> float:
    """Target sparsity at optimizer step ``step``: 0 before ``start_step``, ``sparsity`` from ``end_step`` on, and the
    cubic ramp ``sparsity * (1 - (1 - p) ** 3)`` between them, held constant for ``every_n_steps`` steps at a time."""
    if step < start_step:
        return 0.0
    if step >= end_step:
        return sparsity
    done = (step - start_step) // every_n_steps * every_n_steps
    return sparsity * (1 - (1 - done / (end_step - start_step)) ** 3)


def magnitude_masks(
    weights: dict[str, torch.Tensor], sparsity: float, scope: Scope, masks: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Boolean masks (True: kept) that prune ``round(sparsity * numel)`` of the smallest ``|w|``, per tensor
    (``layer``) or over all of them (``global``). Positions already False in ``masks`` are ranked lowest: they stay
    pruned."""
    scores = {}
    for name, weight in weights.items():
        score = weight.detach().abs().float().flatten()
        if masks is not None:
            score = score.masked_fill(~masks[name].flatten(), -1.0)
        scores[name] = score
    if scope == "layer":
        return {name: _keep_largest(s, sparsity).view_as(weights[name]) for name, s in scores.items()}
    keep = _keep_largest(torch.cat(list(scores.values())), sparsity)
    sizes = [s.numel() for s in scores.values()]
    return {name: part.view_as(weights[name]) for name, part in zip(scores, keep.split(sizes), strict=True)}


def _keep_largest(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    keep = torch.ones_like(score, dtype=torch.bool)
    pruned = round(sparsity * score.numel())
    if pruned:
        keep[torch.topk(score, pruned, largest=False, sorted=False).indices] = False
    return keep


class MagnitudePruning(Callback):
    """Magnitude pruning, one-shot or gradual (cubic ramp), per layer or global; pruned weights stay exactly zero.

    Args:
        sparsity: final fraction of the chosen weights set to zero, in [0, 1).
        scope: ``layer`` (every layer loses the same fraction) or ``global`` (one magnitude threshold for all).
        start_epoch: epoch (0-based) at whose start pruning begins.
        end_epoch: epoch at whose start the final sparsity is reached (the ramp ends); equal to ``start_epoch``:
            one-shot pruning. Must be an epoch of the run (below ``trainer.max_epochs``).
        every_n_steps: optimizer steps between two updates of the masks along the ramp.
        include_head: also prune the task head (``pl_module.head``).
        layers: glob patterns on module paths to prune (``backbone.layer4.*``); default: every Linear and Conv.
        exclude: glob patterns on module paths never to prune (``backbone.conv_stem``).
    """

    # What a pruned run is for is its final, sparse weights: `scripts/train.py` tests the last weights, not the
    # checkpoint chosen on validation accuracy (which may predate the final sparsity).
    tests_last_weights = True

    def __init__(
        self,
        sparsity: float = 0.5,
        scope: Scope = "layer",
        start_epoch: int = 0,
        end_epoch: int = 0,
        every_n_steps: int = 10,
        include_head: bool = False,
        layers: list[str] | None = None,
        exclude: list[str] | None = None,
    ):
        if not 0 <= sparsity < 1:
            raise ValueError(f"MagnitudePruning.sparsity is {sparsity}; it must be in [0, 1)")
        if scope not in ("global", "layer"):
            raise ValueError(f"MagnitudePruning.scope is {scope!r}; choose global or layer")
        if start_epoch < 0 or end_epoch < start_epoch:
            raise ValueError(
                f"MagnitudePruning needs 0 <= start_epoch <= end_epoch, got start_epoch={start_epoch}, "
                f"end_epoch={end_epoch}"
            )
        if every_n_steps < 1:
            raise ValueError(f"MagnitudePruning.every_n_steps is {every_n_steps}; it must be >= 1")
        self.sparsity, self.scope, self.every_n_steps = sparsity, scope, every_n_steps
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.include_head, self.layers, self.exclude = include_head, layers, exclude
        self.masks: dict[str, torch.Tensor] = {}
        self.applied = 0.0  # the scheduled sparsity the masks were last computed for
        self._fraction = 0.0  # the fraction of the chosen weights that the masks prune
        self._hooks = []

    def chosen(self, pl_module: LightningModule) -> dict[str, nn.Parameter]:
        """Parameter name -> weight, for every weight that this callback prunes."""
        head = getattr(pl_module, "head", None)
        in_head = {id(m) for m in head.modules()} if isinstance(head, nn.Module) and not self.include_head else set()
        found = {}
        for name, module in pl_module.named_modules():
            if not isinstance(module, PRUNABLE) or id(module) in in_head:
                continue
            if self.layers and not any(fnmatchcase(name, p) for p in self.layers):
                continue
            if self.exclude and any(fnmatchcase(name, p) for p in self.exclude):
                continue
            found[f"{name}.weight"] = module.weight
        return found

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy):
            raise ValueError(
                "MagnitudePruning under FSDP: its masks hold whole weights while FSDP shards them; prune on one device "
                "or under DDP"
            )
        if any(".lora_" in name for name, _ in pl_module.named_modules()):
            raise ValueError(
                "MagnitudePruning with LoRA adapters: the merged weights of the export would not be sparse; "
                "prune a run without LoRA"
            )
        max_epochs = trainer.max_epochs  # a fast_dev_run (one batch of one epoch) is a smoke test: allowed
        if not trainer.fast_dev_run and max_epochs is not None and 0 < max_epochs <= self.end_epoch:
            raise ValueError(
                f"MagnitudePruning.end_epoch is {self.end_epoch} but the run has {max_epochs} epochs "
                f"(0-{max_epochs - 1}): the final sparsity must be reached within the run"
            )
        self.weights = self.chosen(pl_module)
        if not self.weights:
            raise ValueError(
                f"MagnitudePruning found no Linear or Conv weight to prune (layers={self.layers}, "
                f"exclude={self.exclude}, include_head={self.include_head})"
            )

    def load_state_dict(self, state_dict: dict) -> None:
        masks = state_dict["masks"]
        missing = set(getattr(self, "weights", masks)) ^ set(masks) if masks else set()
        if missing:
            raise ValueError(
                f"MagnitudePruning: the checkpoint's masks do not match this model's weights: {sorted(missing)[:3]}"
            )
        self.masks, self.applied = dict(masks), state_dict["applied"]
        self._fraction = self._count()

    def state_dict(self) -> dict:
        return {"masks": {name: mask.cpu() for name, mask in self.masks.items()}, "applied": self.applied}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if math.isinf(trainer.num_training_batches) and self.end_epoch > 0:
            raise ValueError("MagnitudePruning schedules by epoch: it needs a training loader with a length")
        steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        self._start_step = self.start_epoch * steps_per_epoch
        self._end_step = self.end_epoch * steps_per_epoch
        self.masks = {name: mask.to(self.weights[name].device) for name, mask in self.masks.items()}
        self._apply_masks()  # a resumed run: the checkpoint's weights already hold these zeros
        self._hooks = [opt.register_step_post_hook(lambda *_: self._apply_masks()) for opt in trainer.optimizers]

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        target = scheduled_sparsity(
            trainer.global_step, self._start_step, self._end_step, self.sparsity, self.every_n_steps
        )
        if target != self.applied:
            self.masks = magnitude_masks(self.weights, target, self.scope, self.masks or None)
            self.applied, self._fraction = target, self._count()
            self._apply_masks()
        pl_module.log("prune/sparsity", self._fraction, on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        for name, mask in self.masks.items():
            grad = self.weights[name].grad
            if grad is not None:
                grad.mul_(mask)

    def _count(self) -> float:
        if not self.masks:
            return 0.0
        total = sum(m.numel() for m in self.masks.values())
        return sum(m.numel() - int(m.sum()) for m in self.masks.values()) / total

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for name, mask in self.masks.items():
            self.weights[name].mul_(mask)

    def report(self) -> list[dict]:
        """Per pruned weight and in total (``layer="total"``): numel, zeros in the weight now, sparsity reached."""
        rows = []
        for name, weight in self.weights.items():
            zeros = int((weight == 0).sum())
            rows.append({"layer": name, "numel": weight.numel(), "zeros": zeros, "sparsity": zeros / weight.numel()})
        numel, zeros = sum(r["numel"] for r in rows), sum(r["zeros"] for r in rows)
        return [*rows, {"layer": "total", "numel": numel, "zeros": zeros, "sparsity": zeros / numel}]

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = self.report()
        folder = run_dir(trainer)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / "sparsity.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["layer", "numel", "zeros", "sparsity"])
                writer.writeheader()
                writer.writerows({**r, "sparsity": round(r["sparsity"], 6)} for r in rows)
        _print_sparsity(rows, getattr(pl_module, "layer_groups", None), self.sparsity, self.scope)
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        epoch = torch.load(best, map_location="cpu", weights_only=True, mmap=True)["epoch"] if best else None
        if epoch is not None and epoch < self.end_epoch and self.sparsity > 0:
            rank_zero_warn(
                f"the best checkpoint ({best}) is from epoch {epoch}, before the final sparsity (epoch "
                f"{self.end_epoch}): it is less sparse than asked; the test after fit uses the last weights, and "
                "last.ckpt holds the asked sparsity"
            )


def _print_sparsity(rows: list[dict], layer_groups: dict | None, asked: float, scope: str) -> None:
    """One row per layer group of the backbone (per layer when there is no grouping or few layers), and the total."""
    *layers, total = rows
    if layer_groups and len(layers) > 12:
        grouped: dict[str, list[int]] = {}
        for row in layers:
            inner = row["layer"].removeprefix("backbone.")
            owner = next(
                (g for g, prefixes in layer_groups.items() if any(inner.startswith(p) for p in prefixes)),
                row["layer"].split(".")[0],
            )
            key = f"backbone.{owner}" if row["layer"].startswith("backbone.") else owner
            counts = grouped.setdefault(key, [0, 0, 0])
            counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + row["numel"], counts[2] + row["zeros"]
        layers = [
            {"layer": f"{k} ({n} layer{'s' * (n > 1)})", "numel": numel, "zeros": zeros, "sparsity": zeros / numel}
            for k, (n, numel, zeros) in grouped.items()
        ]
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sparsity reached ({scope} magnitude pruning, asked {asked:.0%}; per layer: sparsity.csv)")
    for column in ("layer", "weights", "zeros", "sparsity"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for row in [*layers, total]:
        table.add_row(row["layer"], f"{row['numel']:,}", f"{row['zeros']:,}", f"{row['sparsity']:.1%}")
    Console().print(table)
