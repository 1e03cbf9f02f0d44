"""FSDP2 for the fine-tuning engine: shard the backbone by its layer groups, then the whole model.

``configs/presets/fsdp.yaml`` selects Lightning's ``ModelParallelStrategy``, which builds a device mesh and calls
the model's ``configure_model``; :meth:`modules.finetune.FineTuneModule.configure_model` then calls :func:`shard`.

Why FSDP2 (``fully_shard``) and not Lightning's ``FSDPStrategy`` (FSDP1): FSDP1 flattens the parameters of each
wrapped unit into one flat tensor whose ``requires_grad`` must be uniform, so a freezing strategy that freezes part
of a unit either fails or needs ``use_orig_params=True``, which keeps gradients for the frozen parameters too
(PyTorch issues 100945, 104690). FSDP2 shards each parameter on its own (DTensor), so freezing any subset, at any
phase change, is just ``requires_grad_`` (what the engine does), and the parameter names stay those of the plain
model: the engine's named groups, ``make plan`` and the checkpoints see the same names. FSDP1 also needs a GPU;
FSDP2 runs on CPU with gloo, which is how the tests check it.

Units: each backbone layer group (``layer_groups``: ``layer4``, ``encoder.layer.5``, ...) whose prefixes name
modules is sharded on its own, so one group's parameters are gathered at a time; the root ``fully_shard`` takes the
rest (stem, head). With ``activation_checkpointing`` each unit recomputes its activations in the backward pass
instead of keeping them (``torch.distributed._composable.checkpoint``, which, unlike ``checkpoint_wrapper``, does not
rename parameters).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def shard_units(backbone: nn.Module, layer_groups: dict[str, Iterable[str]]) -> list[nn.Module]:
    """The modules that the layer groups' prefixes name inside ``backbone``, shallow to deep (prefixes that are not
    a module, such as a lone parameter, are left to the root)."""
    units = []
    for prefixes in layer_groups.values():
        for prefix in prefixes:
            name = prefix.rstrip(".")
            try:
                module = backbone.get_submodule(name) if name else None
            except AttributeError:
                module = None
            if module is not None and module is not backbone and any(True for _ in module.parameters()):
                units.append(module)
    return units


def shard(
    model: nn.Module,
    backbone: nn.Module,
    layer_groups: dict[str, Iterable[str]],
    mesh,
    activation_checkpointing: bool = False,
    param_dtype: torch.dtype | None = None,
) -> list[nn.Module]:
    """Apply FSDP2 to ``model`` in place: each layer-group unit of ``backbone``, then ``model`` itself. Returns the
    units. ``param_dtype`` (e.g. ``torch.bfloat16``) computes in that dtype while the sharded weights, gradients'
    reduction and optimizer state stay float32."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh.ndim > 1:
        mesh = mesh["data_parallel"]
    for parameter in model.parameters():  # FSDP2 shards contiguous tensors only (channels-last conv weights are not)
        if not parameter.is_contiguous():
            parameter.data = parameter.data.contiguous()
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": mesh} | ({"mp_policy": policy} if policy else {})
    units = shard_units(backbone, layer_groups)
    for unit in units:
        if activation_checkpointing:
            checkpoint(unit)
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return units


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 has been applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _model_parallel_strategy():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class FSDP2Strategy(_model_parallel_strategy()):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2: every process of every node is one data-parallel
    shard (its ``"auto"`` sizes would mean data parallel across nodes and tensor parallel within a node, which needs a
    tensor-parallel plan the engine's models do not have). The model's ``configure_model`` shards it
    (:func:`shard`). By default the checkpoint is one full state dict that loads into a single-device model.

    Args:
        save_distributed_checkpoint: one folder of shards per checkpoint instead (models too large to gather).
        kwargs: the other arguments of ``ModelParallelStrategy`` (``process_group_backend``, ``timeout``).
    """

    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs):
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process: one data-parallel shard
        super().setup_environment()
