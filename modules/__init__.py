"""LightningModules: the task protocol (finetune.py), the tasks, the backbone registry and what they share."""

import logging


class _DropEnumWarnings(logging.Filter):
    """torchao registers Enum subclasses as pytree constants when its modules are imported, and torch 2.14 logs a
    deprecation warning for each (``torch/utils/_pytree.py``). transformers imports parts of torchao too, while it
    builds a model, so the filter is installed on the pytree logger when any of our modules is imported (every
    run); it drops that message only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported" not in record.getMessage()


_PYTREE_LOG = logging.getLogger("torch.utils._pytree")
if not any(isinstance(f, _DropEnumWarnings) for f in _PYTREE_LOG.filters):
    _PYTREE_LOG.addFilter(_DropEnumWarnings())
