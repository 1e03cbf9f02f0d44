"""LoRA adapters on a task's backbone, with Hugging Face ``peft``: what the engine needs around them.

``peft.inject_adapter_in_model`` puts LoRA layers in place inside the backbone (``...query`` becomes a LoRA layer
whose frozen original is ``...query.base_layer``), so parameter names keep their prefixes and the engine's layer
groups, named LR groups, freezing strategies and ``make plan`` work unchanged on the adapter parameters. We do not use
``get_peft_model``: its wrapper renames every parameter (``base_model.model.``) and owns the head through
``modules_to_save``, while here the task's head is a module of its own that always trains.

What this module adds, and peft does not give on a bare module:

* the base weights frozen for good (:func:`base_parameter_names`), kept apart from what a freezing strategy toggles;
* a fingerprint of the base weights (:func:`base_fingerprint`), saved in adapter checkpoints so that adapters are
  never loaded onto other base weights;
* :func:`merge_adapters`: the LoRA update folded into each base layer and the plain layer put back, for export.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class LoRA:
    """LoRA settings (``model.lora`` in YAML; see ``configs/presets/lora.yaml``).

    Args:
        r: rank of each update ``B @ A``.
        alpha: scaling numerator: the update is multiplied by ``alpha / r``.
        dropout: dropout on the LoRA branch's input.
        target_modules: which layers get adapters: names that module paths end with (``query``, ``value``,
            ``conv_pw``), or one regular expression that the whole module path must match. peft adapts
            ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.Embedding`` layers.
        train_biases: also train the backbone's biases (peft's ``bias="all"``); the head always trains.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    train_biases: bool = False

    @classmethod
    def from_value(cls, value: LoRA | dict | None) -> LoRA | None:
        if value is None or isinstance(value, LoRA):
            return value
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"model.lora has unknown keys {sorted(unknown)}; known: {list(cls.__dataclass_fields__)}")
        return cls(**value)

    def as_dict(self) -> dict:
        return asdict(self)


def _peft():
    # peft imports torchao when it is installed: its pytree warnings are filtered in modules/__init__.py.
    import peft.tuners.lora
    from peft import LoraConfig, inject_adapter_in_model

    return LoraConfig, inject_adapter_in_model, peft.tuners.lora.LoraLayer


def inject_lora(backbone: nn.Module, settings: LoRA) -> list[str]:
    """Put LoRA layers into ``backbone`` in place and freeze every other backbone parameter (biases too unless
    ``train_biases``); returns the names of the adapted modules. A pattern that matches no layer is an error."""
    if settings.r < 1:
        raise ValueError(f"model.lora.r must be >= 1, got {settings.r}")
    if not 0 <= settings.dropout < 1:
        raise ValueError(f"model.lora.dropout must be in [0, 1), got {settings.dropout}")
    LoraConfig, inject_adapter_in_model, LoraLayer = _peft()

    targets = settings.target_modules
    if isinstance(targets, str):
        targets = [targets]
    # One string is a regular expression for peft; a list holds names that module paths end with.
    pattern = targets[0] if len(targets) == 1 and any(c in targets[0] for c in "^$*+?[]()|\\") else list(targets)
    _plain_pointwise_convs(backbone, pattern)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=pattern,
        bias="all" if settings.train_biases else "none",
    )
    try:
        inject_adapter_in_model(config, backbone)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        layers = sorted({name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if _adaptable(m)})
        raise ValueError(
            f"model.lora.target_modules {targets} match no layer peft can adapt in {type(backbone).__name__}; "
            f"its Linear/Conv/Embedding layers end with: {', '.join(layers[:30])}"
        ) from err
    adapted = [name for name, module in backbone.named_modules() if isinstance(module, LoraLayer)]
    for name, param in backbone.named_parameters():
        trains = ".lora_" in name or (settings.train_biases and name.endswith(".bias"))
        param.requires_grad_(trains)
    return adapted


def _matches(name: str, pattern: str | list[str]) -> bool:
    """peft's rule: a regular expression matches the whole module path; a name matches the path's end."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in pattern)


def _plain_pointwise_convs(backbone: nn.Module, pattern: str | list[str]) -> None:
    """Replace targeted 1x1, stride-1 convolutions of a ``Conv2d`` subclass by plain ``nn.Conv2d`` holding the same
    parameters. peft builds the LoRA branch of a convolution with ``type(base_layer)(in, r, kernel, stride, padding)``,
    which breaks subclasses with another signature: EfficientNet-Lite0's ``Conv2dDynamicSamePadding`` takes its 5th
    argument as ``dilation`` and fails with "non-positive dilation". For a 1x1 kernel at stride 1 "same" padding is
    0, so the plain layer computes exactly the same thing."""
    for name, module in list(backbone.named_modules()):
        if type(module) is nn.Conv2d or not isinstance(module, nn.Conv2d) or not _matches(name, pattern):
            continue
        if module.kernel_size != (1, 1) or module.stride != (1, 1) or module.dilation != (1, 1):
            continue
        plain = nn.Conv2d(
            module.in_channels, module.out_channels, 1, groups=module.groups, bias=module.bias is not None
        )
        plain.weight = module.weight
        if module.bias is not None:
            plain.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, plain)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Embedding)


def base_parameter_names(backbone: nn.Module, settings: LoRA) -> list[str]:
    """Backbone parameters that never train under these LoRA settings (everything but the adapters, and the biases
    when ``train_biases``)."""
    return [
        name
        for name, _ in backbone.named_parameters()
        if ".lora_" not in name and not (settings.train_biases and name.endswith(".bias"))
    ]


def base_fingerprint(named: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the base tensors (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(named):
        source = named[name].detach().to("cpu")
        # A fresh dense copy: a parameter may have any strides (channels-last kernels, views of a larger tensor).
        tensor = torch.empty(source.shape, dtype=source.dtype).copy_(source).reshape(-1)
        digest.update(f"{name}:{tuple(source.shape)}:{source.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@torch.no_grad()
def merge_adapters(module: nn.Module, check: bool = True, atol: float = 1e-4) -> int:
    """Fold every LoRA update into its base layer and put the plain base layer back in its place; returns the number
    of merged layers. With ``check``, each merged layer's output on a random input is compared with the LoRA layer's
    (in eval mode, so LoRA dropout is off) and a difference above ``atol`` is an error."""
    LoraLayer = _peft()[2]

    merged = 0
    for name, layer in list(module.named_modules()):
        if not isinstance(layer, LoraLayer):
            continue
        layer.eval()
        probe = _probe_input(layer.get_base_layer()) if check else None
        expected = layer(probe) if probe is not None else None
        layer.merge(safe_merge=True)
        base = layer.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, base)
        merged += 1
        if probe is not None:
            diff = (base(probe) - expected).abs().max().item()
            if diff > atol:
                raise RuntimeError(f"merging the LoRA layer {name} changed its output by {diff:.2e} (> {atol})")
    return merged


def _probe_input(layer: nn.Module) -> torch.Tensor | None:
    generator = torch.Generator().manual_seed(0)
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        return torch.randn(2, layer.in_features, generator=generator, dtype=weight.dtype)
    if isinstance(layer, nn.Conv2d):  # large enough for the kernel even without padding
        side = max(9, *(d * (k - 1) + 1 for k, d in zip(layer.kernel_size, layer.dilation, strict=True)))
        return torch.randn(1, layer.in_channels, side, side, generator=generator, dtype=weight.dtype)
    if isinstance(layer, nn.Embedding):
        return torch.randint(0, layer.num_embeddings, (2, 5), generator=generator)
    return None
