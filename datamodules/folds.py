"""K-fold cross-validation splits, shared by every data module (``fold`` and ``num_folds`` arguments).

The folds cut the data a module would train and validate on (never its test split) into ``num_folds`` parts, seeded:
stratified by label for classification (scikit-learn's ``StratifiedKFold``), by group for data whose items are not
independent (SQuAD questions of one article stay together), plain otherwise. Fold ``fold`` is the validation split and
the other parts train. ``make cv`` runs one fresh run per fold (``scripts/cv.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold


def check_fold(fold: int | None, num_folds: int | None) -> None:
    """A clear error for fold settings that cannot work (raised when the data module is built)."""
    if num_folds is None:
        if fold is not None:
            raise ValueError(f"data.fold is {fold} but data.num_folds is not set: give both")
        return
    if num_folds < 2:
        raise ValueError(f"data.num_folds is {num_folds}: cross-validation needs at least 2 folds")
    if fold is None or not 0 <= fold < num_folds:
        raise ValueError(f"data.fold is {fold}: give a fold from 0 to {num_folds - 1} (data.num_folds={num_folds})")


def fold_split(
    count: int,
    num_folds: int,
    fold: int,
    seed: int,
    labels: Sequence | None = None,
    groups: Sequence | None = None,
    where: str = "the data",
) -> tuple[list[int], list[int]]:
    """``(train, val)`` indices into ``count`` items for fold ``fold`` of ``num_folds``.

    Args:
        count: number of items.
        num_folds: number of folds (>= 2).
        fold: which fold is the validation split (0-based).
        seed: seed of the assignment to folds.
        labels: one label per item: the folds keep the label proportions (stratified).
        groups: one group per item (an article): a group's items are all in the same fold; the groups are shuffled
            by ``seed`` and dealt to the folds in turn, so every fold holds whole groups.
        where: the data, for messages.
    """
    check_fold(fold, num_folds)
    index = np.arange(count)
    if groups is not None:
        names = list(dict.fromkeys(groups))
        if len(names) < num_folds:
            raise ValueError(f"{where} has {len(names)} group(s) (articles): fewer than data.num_folds={num_folds}")
        order = np.random.default_rng(seed).permutation(len(names))
        held = {names[i] for position, i in enumerate(order) if position % num_folds == fold}
        val = [i for i in index if groups[i] in held]
        return [i for i in index if groups[i] not in held], val
    if count < num_folds:
        raise ValueError(f"{where} has {count} item(s): fewer than data.num_folds={num_folds}")
    if labels is not None:
        counts = np.unique(np.asarray(labels), return_counts=True)[1]
        splitter = StratifiedKFold(num_folds, shuffle=True, random_state=seed) if counts.min() >= num_folds else None
        if splitter is not None:
            train, val = list(splitter.split(index, np.asarray(labels)))[fold]
            return train.tolist(), val.tolist()
        warnings.warn(
            f"{where}: a class has {counts.min()} item(s), fewer than data.num_folds={num_folds}, so the folds cannot "
            "keep the label proportions: plain shuffled folds instead (some folds miss that class)",
            stacklevel=2,
        )
    # No labels, or a class smaller than the number of folds (it cannot be in every fold): plain shuffled folds.
    train, val = list(KFold(num_folds, shuffle=True, random_state=seed).split(index))[fold]
    return train.tolist(), val.tolist()
