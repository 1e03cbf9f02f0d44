"""Named parameter groups with absolute learning rates: the optimizer side of the fine-tuning engine.

Every group exists from the first step (freezing only toggles ``requires_grad``), so optimizers, LR schedules,
checkpoints and DDP never see the set of groups change. Each group carries:

* ``name``: unique, what ``LearningRateMonitor`` shows (``head``, ``backbone.layer4``, ``backbone.layer4.no_wd``);
* ``layer_group``: the engine's unit of freezing (``head`` or ``backbone.<layer group>``); a layer group's decayed
  and non-decayed parameters share it;
* ``lr``: an absolute number (timm's relative ``lr_scale`` does nothing outside timm's schedulers, timm PR #2532).

Biases and normalization weights (every parameter with fewer than 2 dimensions) get no weight decay.
"""

from __future__ import annotations

from torch import nn

from modules.backbones import split_by_group


def layer_lrs(group_names: list[str], backbone_lr: float, layer_decay: float | None = None) -> dict[str, float]:
    """Learning rate of each backbone layer group, given shallow to deep.

    The deepest group gets ``backbone_lr``; with ``layer_decay``, each shallower group gets the LR of the group
    above it times ``layer_decay`` (layer-wise LR decay, as in BEiT and ELECTRA fine-tuning).
    """
    if layer_decay is None:
        return dict.fromkeys(group_names, backbone_lr)
    depth = len(group_names) - 1
    return {name: backbone_lr * layer_decay ** (depth - i) for i, name in enumerate(group_names)}


def build_param_groups(
    backbone: nn.Module,
    layer_groups: dict[str, tuple[str, ...]],
    head: nn.Module,
    lr: float,
    backbone_lr: float,
    layer_decay: float | None = None,
    weight_decay: float = 0.0,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[dict]:
    """Parameter groups for the head and every backbone layer group, each split by weight decay.

    Args:
        backbone: the backbone module; its parameters are split by ``layer_groups``.
        layer_groups: group name -> parameter-name prefixes in ``backbone``, shallow to deep.
        head: the task head (one group, named ``head``, at ``lr``).
        lr: learning rate of the head.
        backbone_lr: learning rate of the deepest backbone group (of all of them without ``layer_decay``).
        layer_decay: factor between the LRs of neighbouring backbone groups, or None.
        weight_decay: weight decay of weights with 2 or more dimensions; biases and norms get none.
        exclude: backbone parameter names that never train (LoRA's frozen base weights): in no group, so the
            optimizer holds no state for them.
    """
    for key, value in (("lr", lr), ("backbone_lr", backbone_lr)):
        if not value > 0:
            raise ValueError(f"model.{key} must be > 0, got {value}")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"model.layer_decay must be in (0, 1], got {layer_decay}")
    lrs = layer_lrs(list(layer_groups), backbone_lr, layer_decay)
    # A head tied to the backbone (a language-model head's output matrix is the word embeddings) trains its shared
    # weight with the backbone's group: a parameter may sit in one optimizer group only.
    in_backbone = {id(p) for p in backbone.parameters()}
    units = [("head", [p for p in head.parameters() if id(p) not in in_backbone], lr)]
    excluded = {id(p) for n, p in backbone.named_parameters() if n in exclude}
    units += [
        (f"backbone.{g}", [p for p in params if id(p) not in excluded], lrs[g])
        for g, params in split_by_group(backbone, layer_groups).items()
    ]
    groups = []
    for unit, params, unit_lr in units:
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        for name, members, wd in ((unit, decay, weight_decay), (f"{unit}.no_wd", no_decay, 0.0)):
            if members:
                groups.append({"name": name, "layer_group": unit, "params": members, "lr": unit_lr, "weight_decay": wd})
    return groups
