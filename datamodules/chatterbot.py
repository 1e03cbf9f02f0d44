"""Topic classification of real English chat lines from the PyPI package ``chatterbot-corpus``: offline text data.

Each line of a topic file (``ai``, ``trivia``, ``emotion``, ...) is a text labelled with its topic. The topics are
very unequal (trivia has 536 lines, health 9): ``min_lines`` drops the smallest, and accuracy flatters a model that
favours the large ones, so the experiment monitors macro F1 (every topic counts the same).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
import yaml

from datamodules.text_classification import Row, TextClassificationDataModule


def corpus_lines(language: str = "english") -> dict[str, list[str]]:
    """Topic -> its distinct lines; lines that occur under several topics are left out (their label is ambiguous)."""
    import chatterbot_corpus

    folder = Path(os.path.dirname(chatterbot_corpus.__file__)) / "data" / language
    topics: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.yml")):
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        lines = {str(line).strip() for conversation in content.get("conversations", []) for line in conversation}
        topics[path.stem] = sorted(line for line in lines if line)
    counts = Counter(line for lines in topics.values() for line in lines)
    return {topic: [line for line in lines if counts[line] == 1] for topic, lines in topics.items()}


class ChatterbotTopicsDataModule(TextClassificationDataModule):
    """Chat lines labelled with their topic, split per topic into train/val/test by fractions and a seed.

    Args:
        min_lines: leave out topics with fewer distinct lines than this.
        val_fraction: share of each topic for validation.
        test_fraction: share of each topic for testing.
        seed: seed of the split.
        tokenizer: the model's encoder name.
        max_length: longest sequence in tokens.
        batch_size: batch size of every loader.
        group_by_length: batch training texts of similar length together.
        cache_dir: where tokenized splits are cached.
        num_folds: cross-validation (``make cv``): folds of the training and validation lines, stratified by topic.
        fold: the fold that is the validation split.
    """

    def __init__(
        self,
        min_lines: int = 40,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        tokenizer: str = "all-minilm-l6-v2",
        max_length: int = 64,
        batch_size: int = 32,
        group_by_length: bool = True,
        cache_dir: str = ".cache/tokenized",
        num_folds: int | None = None,
        fold: int | None = None,
    ):
        super().__init__(
            data_dir=None,
            text_column="text",
            label_column="label",
            tokenizer=tokenizer,
            max_length=max_length,
            batch_size=batch_size,
            group_by_length=group_by_length,
            val_fraction=val_fraction,
            seed=seed,
            cache_dir=cache_dir,
            num_folds=num_folds,
            fold=fold,
        )
        self.options.update(min_lines=min_lines, test_fraction=test_fraction)

    def load_splits(self) -> dict[str, tuple[list[Row], str]]:
        hp = self.options
        splits: dict[str, list[Row]] = {"train": [], "val": [], "test": []}
        generator = torch.Generator().manual_seed(hp.seed)
        for topic, lines in corpus_lines().items():
            if len(lines) < hp.min_lines:
                continue
            order = torch.randperm(len(lines), generator=generator).tolist()
            n_val, n_test = round(len(lines) * hp.val_fraction), round(len(lines) * hp.test_fraction)
            parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
            for split, indices in parts.items():
                splits[split] += [{"text": lines[i], "label": topic} for i in indices]
        return {split: (rows, f"chatterbot-corpus ({split})") for split, rows in splits.items()}
