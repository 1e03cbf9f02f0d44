"""The task protocol: what every fine-tuning module shares, and the hooks the scripts call instead of asking which
task a model is.

A task (``ImageClassifier``, ``TextClassifier``, ``ExtractiveQA``, ``MaskedLM``, or yours) subclasses
:class:`FineTuneModule`, takes its own arguments plus ``**kwargs`` and passes ``**kwargs`` on: the learning-rate and
optimizer arguments below are declared and documented here once, and LightningCLI still shows them in each task's
``--help`` (jsonargparse follows ``**kwargs`` into this constructor). A task sets ``backbone`` (a module whose
parameters ``layer_groups`` cover exactly once, shallow to deep) and ``head``, and implements ``forward`` and the
Lightning steps. The optional hooks:

* :meth:`predict_path`: predictions for a file or folder of new inputs (``scripts/predict.py``);
* :meth:`export_meta` and :meth:`example_input`: what ``scripts/export.py`` writes beside the weights, and an input
  for the graph exports (ONNX, TorchScript) where the task has a tensor input;
* :meth:`test_artifacts`: files the run keeps after ``test`` (written by ``callbacks.tracking.RunReport``, so a
  module never needs to know where the run's folder is).

What a task needs from its data (number of classes, class names, the tokenizer, the image size) is linked in
``scripts/train.py`` with LightningCLI's ``link_arguments``, so a model gets it as a constructor argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from modules.adapters import LoRA, base_fingerprint, base_parameter_names, inject_lora, merge_adapters
from modules.backbones import split_by_group
from modules.compiling import compile_in_place, compile_options, is_compiled, recompile, strip_compile_prefix, uncompile
from modules.param_groups import build_param_groups
from modules.sharding import is_sharded, shard


class FineTuneModule(LightningModule):
    """Base class of every task: the engine's named parameter groups and their learning rates.

    Args:
        lr: peak learning rate of the head.
        backbone_lr: peak learning rate of the backbone (of its deepest group with ``layer_decay``); None uses
            ``lr * backbone_lr_ratio``.
        backbone_lr_ratio: backbone LR as a fraction of the head's when ``backbone_lr`` is None (the classic
            recipe: 0.1).
        layer_decay: layer-wise LR decay: each backbone group gets the LR of the group above it times this.
        weight_decay: weight decay of weight matrices and kernels (biases and norm parameters get none).
        optimizer: optimizer class (``class_path`` in YAML); it receives the named parameter groups.
        lora: LoRA adapters on the backbone (``modules.adapters.LoRA``: rank, alpha, dropout, target modules;
            ``configs/presets/lora.yaml``): the backbone's own weights stay frozen, its adapters and the head train,
            and checkpoints hold only what trains plus a fingerprint of the base weights.
        compile: ``torch.compile`` the backbone for training and evaluation: true (the defaults) or
            ``torch.compile``'s arguments (``{mode: max-autotune-no-cudagraphs, dynamic: true}``). The backbone is
            compiled in place when a Trainer starts (``configure_model``), so checkpoints keep plain keys (no
            ``_orig_mod.``), and recompiled whenever a freezing strategy changes what trains. The first steps and
            each phase change pay the compilation; ``make bench ARGS="--only compile"`` measures whether it pays off
            on the machine at hand.
        activation_checkpointing: under FSDP (``configs/presets/fsdp.yaml``), recompute each backbone layer
            group's activations in the backward pass instead of keeping them (``modules/sharding.py``).
    """

    def __init__(
        self,
        lr: float = 1e-3,
        backbone_lr: float | None = None,
        backbone_lr_ratio: float = 0.1,
        layer_decay: float | None = None,
        weight_decay: float = 0.01,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lora: LoRA | None = None,
        compile: bool | dict[str, Any] = False,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        # Collects the arguments of every constructor in the chain (the task's and these), whatever their defaults.
        self.save_hyperparameters(ignore=["optimizer"])
        self.lora = LoRA.from_value(lora)
        # A plain dict in the checkpoint's hyperparameters: checkpoints are read with weights_only=True.
        self.hparams.lora = self.lora.as_dict() if self.lora else None
        self.optimizer = optimizer
        self.frozen_base: frozenset[str] = frozenset()  # backbone parameters that never train (LoRA's base)
        self._base_fingerprint: str | None = None
        # Not `self.compile`: that is nn.Module's method.
        self.compile_options: dict[str, Any] | None = compile_options(compile)

    def apply_adapters(self) -> None:
        """The last step of a task's ``__init__``, once ``backbone`` holds its final weights: inject the LoRA adapters
        of ``model.lora`` (nothing without it)."""
        if self.lora is None:
            return
        self.adapted_layers = inject_lora(self.backbone, self.lora)
        self.frozen_base = frozenset(base_parameter_names(self.backbone, self.lora))
        self.on_trainable_changed()

    # --- torch.compile (modules/compiling.py) ------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Compile the backbone (``model.compile``) in place when a Trainer starts ``fit``, ``validate``, ``test`` or
        ``predict``: after the constructor has injected the LoRA adapters and frozen their base, after the freezing
        strategy's ``setup`` has frozen what never trains, and never in the constructor, so a model rebuilt from a
        checkpoint for export, prediction or as a distillation teacher stays eager. Compiling in place keeps the
        state dict's keys, so a checkpoint restored after this hook (a resumed fit) loads as it is. Compilation
        itself happens at the first forward pass. (Lightning's ``load_from_checkpoint`` calls this hook too, with no
        Trainer: nothing is compiled then.)"""
        if self._trainer is None:
            return
        mesh = self.device_mesh  # set by ModelParallelStrategy (configs/presets/fsdp.yaml): shard first, then compile
        if mesh is not None and not is_sharded(self):
            shard(
                self,
                self.backbone,
                self.layer_groups,
                mesh,
                activation_checkpointing=self.hparams.get("activation_checkpointing", False),
            )
        elif self.hparams.get("activation_checkpointing"):
            rank_zero_warn("activation_checkpointing applies under FSDP (configs/presets/fsdp.yaml) only; ignored")
        if self.compile_options is not None and not is_compiled(self.backbone):
            compile_in_place(self.backbone, self.compile_options)

    def on_trainable_changed(self) -> None:
        """Called after the set of parameters that require gradients changed (a freezing strategy at a phase
        change, adapters injected): a compiled backbone is compiled again, so no graph traced for the previous set
        is reused (pytorch #139476). Nothing happens when the backbone is not compiled."""
        if self.compile_options is not None and is_compiled(self.backbone):
            recompile(self.backbone, self.compile_options)

    def tunable_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        """Layer group -> the backbone parameters that may train in it (what a freezing strategy toggles): all of
        them, or only the adapters (and biases) under LoRA."""
        groups = split_by_group(self.backbone, self.layer_groups)
        if not self.frozen_base:
            return groups
        tunable = {id(p) for n, p in self.backbone.named_parameters() if n not in self.frozen_base}
        return {group: [p for p in params if id(p) in tunable] for group, params in groups.items()}

    def base_fingerprint(self) -> str:
        """SHA-256 of the frozen base weights (computed once: they never change)."""
        if self._base_fingerprint is None:
            named = dict(self.backbone.named_parameters())
            self._base_fingerprint = base_fingerprint({n: named[n] for n in self.frozen_base})
        return self._base_fingerprint

    def for_export(self) -> FineTuneModule:
        """The model as it should be served: LoRA adapters merged into plain layers (each merged layer checked
        against its adapter layer), so the export needs neither peft nor the base weights separately; a compiled
        backbone runs eagerly again (tracing, ONNX and merging need the plain modules; its weights were plain all
        along)."""
        uncompile(self.backbone)
        if self.lora is not None and self.frozen_base:
            count = merge_adapters(self.backbone)
            print(f"merged the LoRA adapters of {count} layers into the backbone")
            self.frozen_base = frozenset()
        return self

    def configure_optimizers(self):
        hp = self.hparams
        backbone_lr = hp.backbone_lr if hp.backbone_lr is not None else hp.lr * hp.backbone_lr_ratio
        groups = build_param_groups(
            self.backbone,
            self.layer_groups,
            self.head,
            hp.lr,
            backbone_lr,
            hp.layer_decay,
            hp.weight_decay,
            exclude=self.frozen_base,
        )
        return self.optimizer(groups)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain keys even if something wrapped a submodule in torch.compile's OptimizedModule (Lightning #17415).
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = strip_compile_prefix(checkpoint["state_dict"])
        if self.frozen_base:
            # LoRA: the checkpoint holds what trains (adapters, head, buffers such as BatchNorm statistics) and a
            # fingerprint of the base weights, which are rebuilt from the backbone's source when it is loaded.
            base = {f"backbone.{name}" for name in self.frozen_base}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in base}
            checkpoint["lora_base_fingerprint"] = self.base_fingerprint()
            return
        # The weights are in the state dict: rebuilding from this checkpoint must not download or read them again.
        checkpoint["hyper_parameters"] |= {"pretrained": False, "backbone_checkpoint": None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" in checkpoint:  # written from a model wrapped by torch.compile(...): `_orig_mod.` in its keys
            checkpoint["state_dict"] = strip_compile_prefix(checkpoint["state_dict"])
        expected = checkpoint.get("lora_base_fingerprint")
        if expected is None:
            return
        if not self.frozen_base:
            raise ValueError(
                "this checkpoint holds LoRA adapters, but the model has none: build it with its model.lora"
            )
        if expected != self.base_fingerprint():
            raise ValueError(
                "this checkpoint's LoRA adapters were trained on other base weights (fingerprint "
                f"{expected[:12]}, this model's {self.base_fingerprint()[:12]}): build the model on the same backbone "
                "weights (model.backbone/encoder, pretrained, backbone_checkpoint)"
            )
        named = dict(self.backbone.named_parameters())
        checkpoint["state_dict"] |= {f"backbone.{n}": named[n].detach() for n in self.frozen_base}

    # --- hooks of the task protocol -------------------------------------------------------------------------------

    def predict_path(self, source: Path, datamodule) -> list[dict]:
        """Predictions for the new inputs at ``source`` (a file, or a folder where the task reads folders), one dict
        per input; ``datamodule`` is the run's data module, rebuilt from its config (for its evaluation
        preprocessing)."""
        raise ValueError(f"{type(self).__name__} does not predict on files (no predict_path)")

    def export_meta(self) -> dict:
        """What a serving process needs beside the weights (input shape and normalisation, tokenizer, ...)."""
        return {}

    def example_input(self) -> torch.Tensor | None:
        """An input batch for the graph exports (ONNX, TorchScript); None when the task's input is not one tensor."""
        return None

    def test_artifacts(self) -> dict[str, str]:
        """``{file name: text}`` the run keeps after ``test`` (predictions, a confusion matrix)."""
        return {}
