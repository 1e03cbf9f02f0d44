"""Data sets from the Hugging Face hub (``data.hf_dataset``): ``datasets`` is the optional ``hf`` extra of the
project (``pip install -e '.[hf]'``; ``make install`` includes it), imported only when a data module asks for one."""

from __future__ import annotations

from typing import Any

HF_EXTRA = "pip install -e '.[hf]'"


def load_hf_dataset(name: str, config: str | None = None) -> Any:
    """``datasets.load_dataset(name, config)``; without the ``datasets`` package, one line naming the extra."""
    try:
        from datasets import load_dataset
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"data.hf_dataset {name!r} needs the Hugging Face 'datasets' package ({err.name} is not installed): "
            f"{HF_EXTRA}"
        ) from err
    return load_dataset(name, config)
