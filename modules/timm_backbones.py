"""timm models as backbones: ``build_backbone("timm:<name>")`` for any model of ``timm.list_models()``.

Everything the registry contract needs comes from timm itself rather than from a per-family table here, so every timm
architecture works without code in this repository:

* features: the model is built with ``num_classes=0``, so its forward returns the pooled pre-logits features;
* layer groups: timm's own coarse grouping (``model.group_matcher(coarse=True)``, the one its layer-wise LR decay
  uses), turned into our parameter-name prefixes: ``stem``, then ``stage1``, ``stage2``, ... shallow to deep;
* normalization and input size: timm's data config (``resolve_model_data_config``) of the chosen weights; the input
  size is fixed only when the weights' config says so (ViT-like models with fixed position embeddings).

Pretrained weights are downloaded by timm from the Hugging Face Hub (or a URL) the first time, so they need internet;
``pretrained=False`` builds any model offline. Weight tags select weights: ``timm:vit_tiny_patch16_224.augreg_in21k``.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Callable, Sequence

from torch import nn

from modules.backbone_spec import Backbone


def build_timm_backbone(name: str, pretrained: bool) -> Backbone:
    """Build timm model ``name`` (``timm:`` already removed) as a :class:`Backbone`.

    Raises:
        ValueError: ``name`` is not a timm model (the message suggests a ``timm.list_models`` pattern).
        OSError: the pretrained weights cannot be downloaded.
    """
    import timm

    # hf-hub:/local-dir: sources are resolved by timm itself; only plain names can be checked against the registry.
    if ":" not in name and not timm.is_model(name):
        raise ValueError(_unknown_model_message(name))
    # Offline, the download raises an OSError (huggingface_hub's errors and urllib's URLError all are), which
    # build_backbone turns into one line naming what works offline.
    model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    config = timm.data.resolve_model_data_config(model)
    return Backbone(
        module=model,
        num_features=_feature_width(model),
        layer_groups=timm_layer_groups(model),
        mean=_three(config["mean"]),
        std=_three(config["std"]),
        input_size=_fixed_input_size(name, model, config["input_size"]),
    )


def timm_layer_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """timm's coarse parameter grouping as prefix groups ``stem, stage1, ...``, shallow to deep.

    timm's grouping is by regular expressions over parameter names; the registry's is by name prefixes. Each group
    gets the shortest module paths (``layer1.``) whose parameters all fall in that group, or, where a module is
    shared between groups, the parameter names themselves. The few models without a coarse grouping (MetaFormer,
    PiT, ...) get timm's fine grouping, or else one group per top-level module or per stage of a top-level sequence.
    """
    from timm.models import group_parameters

    grouped = group_parameters(model, _group_matcher(model))
    owner = {pname: gid for gid, pnames in grouped.items() for pname in pnames}
    groups_below: dict[str, set[int]] = defaultdict(set)  # module path "a.b." -> groups of the parameters under it
    for pname, gid in owner.items():
        parts = pname.split(".")
        for depth in range(1, len(parts)):
            groups_below[".".join(parts[:depth]) + "."].add(gid)

    prefixes: dict[int, list[str]] = {gid: [] for gid in sorted(grouped)}
    for pname, gid in owner.items():
        parts = pname.split(".")
        paths = (".".join(parts[:depth]) + "." for depth in range(1, len(parts)))
        prefix = next((p for p in paths if groups_below[p] == {gid}), pname)
        if prefix not in prefixes[gid]:
            prefixes[gid].append(prefix)

    # A bare parameter name is a prefix of any longer name that starts with it (`pos_embed` of `pos_embed_x.w`).
    for gid, own in prefixes.items():
        for prefix in (p for p in own if not p.endswith(".")):
            clash = [p for p, g in owner.items() if g != gid and p.startswith(prefix)]
            if clash:
                raise ValueError(f"timm parameter groups cannot be told apart by name: {prefix!r} and {clash[0]!r}")
    return {("stem" if i == 0 else f"stage{i}"): tuple(own) for i, own in enumerate(prefixes.values())}


def _group_matcher(model: nn.Module) -> dict | Callable[[str], int]:
    for coarse in (True, False):
        try:
            return model.group_matcher(coarse=coarse)
        except (AttributeError, AssertionError, NotImplementedError):  # timm asserts where a grouping is missing
            continue
    # Module order is forward order in timm's models: stem, stages, final norm.
    prefixes: list[str] = []
    for name, child in model.named_children():
        parts = [f"{name}.{n}." for n, c in child.named_children() if any(True for _ in c.parameters())]
        flat = any(True for _ in child.parameters(recurse=False))
        if isinstance(child, nn.Sequential | nn.ModuleList) and len(parts) > 1 and not flat:
            prefixes += parts
        elif any(True for _ in child.parameters()):
            prefixes.append(f"{name}.")

    def ordinal(pname: str) -> int:  # parameters of the model itself (cls_token, pos_embed) go with the stem
        return next((i for i, prefix in enumerate(prefixes) if pname.startswith(prefix)), 0)

    return ordinal


def _feature_width(model: nn.Module) -> int:
    # With num_classes=0 the forward returns the pre-logits features: `head_hidden_size` where the head has its own
    # hidden layer (MobileNetV3's conv_head), `num_features` otherwise.
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _fixed_input_size(name: str, model: nn.Module, input_size: tuple[int, int, int]) -> int | None:
    if not getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False):
        return None
    _, height, width = input_size
    if height != width:
        raise ValueError(f"timm model {name!r} takes only {height}x{width} px images; the data feeds square ones")
    return int(height)


def _three(values: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    return values * 3 if len(values) == 1 else values  # type: ignore[return-value]


def _unknown_model_message(name: str) -> str:
    import timm

    arch = name.split(".", 1)[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=3)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return f"unknown timm model {name!r}{hint}; list the names with timm.list_models('*{arch}*')"
