"""``torch.compile`` for fine-tuning: compiled in place, recompiled when the trainable set changes, and checkpoints
with plain keys either way.

Two known traps, and what this module does about them:

* ``torch.compile(model)`` returns a wrapper (``OptimizedModule``) whose state dict prefixes every key with
  ``_orig_mod.``, so its checkpoints do not load into a plain model (Lightning #17415). Here a module is compiled
  **in place** (``nn.Module.compile()``: only its ``__call__`` goes through Dynamo), so its state dict, its
  parameters' names and its place in the parent module never change. Checkpoints that other code wrote from a
  wrapped model still load: :func:`strip_compile_prefix` removes ``_orig_mod.`` wherever it appears in a key.
* Dynamo may reuse a graph compiled while other parameters required gradients (pytorch #139476: a stale graph,
  wrong or missing gradients after a layer is unfrozen). Freezing strategies change ``requires_grad`` between
  epochs, so after each change the module is recompiled from scratch (:func:`recompile`: Dynamo's caches reset and
  the module compiled again) instead of trusting the guards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ORIG_MOD = "_orig_mod."
# torch.compile's keyword arguments (the function to compile aside); a typo is an error at construction time.
COMPILE_KWARGS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")


def compile_options(value: bool | dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``torch.compile`` keyword arguments that ``value`` (a module's ``compile`` argument) asks for: None for
    off (False or None), ``{}`` for the defaults (True), the dict itself otherwise (checked)."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"model.compile is {value!r}; give true, false, or torch.compile's arguments as a dict")
    unknown = sorted(set(value) - set(COMPILE_KWARGS))
    if unknown:
        raise ValueError(f"model.compile has unknown torch.compile arguments {unknown}; choose from {COMPILE_KWARGS}")
    return dict(value)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled in place (``nn.Module.compile()``)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_in_place(module: nn.Module, options: dict[str, Any]) -> None:
    """Compile ``module``'s calls with ``torch.compile(**options)``, keeping the module itself (and its state dict
    keys) as they are. Compilation itself happens at the first call."""
    module.compile(**options)


def uncompile(module: nn.Module) -> None:
    """Undo :func:`compile_in_place`: calls run the eager ``forward`` again (for export, tracing, merging adapters)."""
    module._compiled_call_impl = None


def recompile(module: nn.Module, options: dict[str, Any]) -> None:
    """Forget every graph compiled so far and compile ``module`` again: after its trainable parameters changed.

    ``torch.compiler.reset()`` clears Dynamo's caches for the whole process (graphs live on the code objects they
    were compiled from, which every ``nn.Module`` shares, so clearing only this module's wrapper would not drop
    them); a training process compiles one model, so that costs a recompilation at the next step, nothing more."""
    torch.compiler.reset()
    uncompile(module)
    compile_in_place(module, options)


def strip_compile_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with ``_orig_mod.`` removed from its keys, at the start (``torch.compile(model)``) or inside
    (``model.backbone = torch.compile(model.backbone)``); the same dict when no key has it."""
    if not any(ORIG_MOD in key for key in state):
        return state
    return {key.replace(ORIG_MOD, ""): value for key, value in state.items()}
