"""Freezing strategies: which backbone layer groups train in each epoch, and what frozen BatchNorm layers do.

Why not Lightning's ``BackboneFinetuning``: it adds parameter groups to the optimizer mid-run, which breaks LR
schedulers, re-freezes on resume and breaks DDP (Lightning #8720, #14674, #20340, #21901). Here every parameter group
exists from the first step (``modules.param_groups``) and a strategy only toggles ``requires_grad``:

* in ``on_train_epoch_start``, after the strategy has wrapped the model, so frozen layers build no autograd graph
  and skip their backward pass;
* as a pure function of the epoch (:meth:`BackboneFreezing.trainable`), so a resumed run restores its phase;
* parameters frozen in every epoch of the run are frozen in ``setup``, before DDP wraps the model; if the trainable
  set changes during the run, DDP must run with ``find_unused_parameters=True`` (checked at start-up);
* when a ``requires_grad`` flag actually changed, the module's ``on_trainable_changed()`` is called
  (``FineTuneModule``: a compiled backbone is recompiled, so no graph traced for the previous set is reused).

The BatchNorm policy is explicit, because a frozen BatchNorm in train mode still updates its running statistics:

* ``train``: BatchNorm layers follow the model's mode (statistics update even in frozen groups);
* ``freeze_stats``: BatchNorm layers of frozen groups are kept in eval mode (statistics fixed);
* ``freeze_all``: every backbone BatchNorm layer is in eval mode and its affine parameters never train.

Strategies (``callbacks.unfreezing.<Name>`` in the YAML ``trainer.callbacks``): :class:`NoFreeze`, :class:`Freeze`
(a linear probe), :class:`FreezeUnfreeze`, :class:`UnfreezeMilestones`, :class:`GradualUnfreezing`.
"""

from __future__ import annotations

from typing import Literal

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from modules.backbones import split_by_group

BNPolicy = Literal["train", "freeze_stats", "freeze_all"]


class BackboneFreezing(Callback):
    """Base class: subclasses say which backbone layer groups train in a given epoch.

    The LightningModule must have ``backbone`` (an ``nn.Module``) and ``layer_groups`` (group name -> parameter
    prefixes, shallow to deep). The head always trains.

    Args:
        bn_policy: what BatchNorm layers do: ``train``, ``freeze_stats`` or ``freeze_all`` (see the module docstring).
    """

    def __init__(self, bn_policy: BNPolicy = "freeze_stats"):
        if bn_policy not in ("train", "freeze_stats", "freeze_all"):
            raise ValueError(f"bn_policy is {bn_policy!r}; choose train, freeze_stats or freeze_all")
        self.bn_policy = bn_policy

    def trainable(self, epoch: int, groups: list[str]) -> set[str]:
        """Names of the backbone layer groups (``groups``, shallow to deep) that train in ``epoch``."""
        raise NotImplementedError

    def validate(self, groups: list[str]) -> None:
        """Raise a clear error if the strategy's settings do not fit these layer groups."""

    def phases(self, groups: list[str], max_epochs: int) -> list[tuple[int, set[str]]]:
        """``(first epoch, trainable groups)`` for each change of the trainable set within ``max_epochs``."""
        phases: list[tuple[int, set[str]]] = []
        for epoch in range(max(1, max_epochs)):
            current = self.trainable(epoch, groups)
            if not phases or phases[-1][1] != current:
                phases.append((epoch, current))
        return phases

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategies = [type(c).__name__ for c in trainer.callbacks if isinstance(c, BackboneFreezing)]
        if len(strategies) > 1:
            raise ValueError(
                f"one freezing strategy per run, found {len(strategies)} in trainer.callbacks: {strategies}"
            )
        self.groups = list(pl_module.layer_groups)
        self.validate(self.groups)
        self.batchnorms = _batchnorms_by_group(pl_module.backbone, pl_module.layer_groups)
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 0
        phases = self.phases(self.groups, max_epochs) if max_epochs else None
        ever = set().union(*(t for _, t in phases)) if phases else set(self.groups)
        # Frozen for the whole run: freeze before DDP wraps the model, so DDP never waits for their gradients.
        self._apply(pl_module, ever)
        changes = phases is None or len(phases) > 1
        strategy = trainer.strategy
        if changes and isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters"):
            raise ValueError(
                f"{type(self).__name__} changes the trainable layers during the run, which DDP allows only with "
                "find_unused_parameters=True: use --trainer.strategy=ddp_find_unused_parameters_true "
                "or configs/presets/ddp.yaml"
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A fit resumed in the middle of an epoch starts with no on_train_epoch_start: set that epoch's phase here.
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.current = self.trainable(trainer.current_epoch, self.groups)
        self._apply(pl_module, self.current)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        # Every batch: Lightning puts the model back in train mode after each validation run.
        if self.bn_policy == "train" or not pl_module.training:
            return
        for group, layers in self.batchnorms.items():
            train = self.bn_policy == "freeze_stats" and group in self.current
            for layer in layers:
                layer.train(train)

    def _apply(self, pl_module: LightningModule, trainable: set[str]) -> None:
        """Make the groups in ``trainable`` train and the others not; tell the module when any flag changed."""
        # The parameters are looked up at every change, not kept from setup: FSDP2 (modules/sharding.py) replaces
        # every parameter object when it shards the model, after the callbacks' setup. Under LoRA only the adapters
        # are tunable: the base weights stay frozen whatever the phase.
        tunable = getattr(pl_module, "tunable_parameters", None)
        self.params = tunable() if tunable else split_by_group(pl_module.backbone, pl_module.layer_groups)
        before = [p.requires_grad for p in pl_module.parameters()]
        for group in self.groups:
            self._set_trainable(group, group in trainable)
        changed = before != [p.requires_grad for p in pl_module.parameters()]
        if changed and hasattr(pl_module, "on_trainable_changed"):
            pl_module.on_trainable_changed()

    def _set_trainable(self, group: str, trainable: bool) -> None:
        for param in self.params[group]:
            param.requires_grad_(trainable)
        if self.bn_policy == "freeze_all":
            for layer in self.batchnorms[group]:
                layer.requires_grad_(False)


def _batchnorms_by_group(backbone: nn.Module, layer_groups: dict[str, tuple[str, ...]]) -> dict[str, list[nn.Module]]:
    found: dict[str, list[nn.Module]] = {group: [] for group in layer_groups}
    for name, module in backbone.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for group, prefixes in layer_groups.items():
                if any(f"{name}.".startswith(p) or name.startswith(p) for p in prefixes):
                    found[group].append(module)
                    break
    return found


class NoFreeze(BackboneFreezing):
    """Every layer trains from the first step (the BatchNorm policy still applies)."""

    def trainable(self, epoch: int, groups: list[str]) -> set[str]:
        return set(groups)


class Freeze(BackboneFreezing):
    """The backbone never trains: only the head learns (a linear probe when the head is linear)."""

    def trainable(self, epoch: int, groups: list[str]) -> set[str]:
        return set()


class FreezeUnfreeze(BackboneFreezing):
    """The head trains alone until ``unfreeze_epoch``, then everything trains.

    Args:
        unfreeze_epoch: first epoch (0-based) in which the whole backbone trains.
        bn_policy: BatchNorm policy (``train``, ``freeze_stats``, ``freeze_all``).
    """

    def __init__(self, unfreeze_epoch: int = 1, bn_policy: BNPolicy = "freeze_stats"):
        super().__init__(bn_policy)
        if unfreeze_epoch < 0:
            raise ValueError(f"FreezeUnfreeze.unfreeze_epoch must be >= 0, got {unfreeze_epoch}")
        self.unfreeze_epoch = unfreeze_epoch

    def trainable(self, epoch: int, groups: list[str]) -> set[str]:
        return set(groups) if epoch >= self.unfreeze_epoch else set()


class UnfreezeMilestones(BackboneFreezing):
    """Named layer groups unfreeze at given epochs; groups not named stay frozen.

    Args:
        milestones: layer group name (``layer4`` or ``backbone.layer4``) -> first epoch in which it trains. Deeper
            groups must not unfreeze later than shallower ones.
        bn_policy: BatchNorm policy (``train``, ``freeze_stats``, ``freeze_all``).
    """

    def __init__(self, milestones: dict[str, int], bn_policy: BNPolicy = "freeze_stats"):
        super().__init__(bn_policy)
        self.milestones = {name.removeprefix("backbone."): epoch for name, epoch in milestones.items()}
        negative = {name: epoch for name, epoch in self.milestones.items() if epoch < 0}
        if negative:
            raise ValueError(f"UnfreezeMilestones epochs must be >= 0, got {negative}")

    def validate(self, groups: list[str]) -> None:
        unknown = sorted(set(self.milestones) - set(groups))
        if unknown:
            raise ValueError(f"UnfreezeMilestones names unknown layer groups {unknown}; this backbone has {groups}")
        named = [g for g in groups if g in self.milestones]  # shallow to deep
        for shallow, deep in zip(named, named[1:], strict=False):
            if self.milestones[shallow] < self.milestones[deep]:
                raise ValueError(
                    f"UnfreezeMilestones out of order: {shallow!r} (epoch {self.milestones[shallow]}) would unfreeze "
                    f"before the deeper {deep!r} (epoch {self.milestones[deep]}); unfreeze from the top down"
                )

    def trainable(self, epoch: int, groups: list[str]) -> set[str]:
        return {g for g in groups if g in self.milestones and epoch >= self.milestones[g]}


class GradualUnfreezing(BackboneFreezing):
    """ULMFiT's gradual unfreezing: the head trains alone, then one more group from the top each epoch.

    Args:
        start_epoch: epoch in which the deepest group starts training (before it, only the head trains).
        groups_per_epoch: how many more groups unfreeze each epoch.
        bn_policy: BatchNorm policy (``train``, ``freeze_stats``, ``freeze_all``).
    """

    def __init__(self, start_epoch: int = 1, groups_per_epoch: int = 1, bn_policy: BNPolicy = "freeze_stats"):
        super().__init__(bn_policy)
        if start_epoch < 0 or groups_per_epoch < 1:
            raise ValueError(
                f"GradualUnfreezing needs start_epoch >= 0 and groups_per_epoch >= 1, got {start_epoch}, "
                f"{groups_per_epoch}"
            )
        self.start_epoch, self.groups_per_epoch = start_epoch, groups_per_epoch

    def trainable(self, epoch: int, groups: list[str]) -> set[str]:
        count = max(0, epoch - self.start_epoch + 1) * self.groups_per_epoch
        return set(groups[max(0, len(groups) - count) :]) if count else set()
