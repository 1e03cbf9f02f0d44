"""Text files in class folders: ``<root>/<class>/<file>.txt``, one document per file, already split or split here.

Two layouts, as for images (``datamodules/image_folder.py``):

* ``data_dir/train/<class>/*.txt``, ``data_dir/val/<class>/*.txt`` and optionally ``data_dir/test/<class>/*.txt``,
  used as they are (no ``val/``: it is split off ``train/`` per class; no ``test/``: the test stage uses ``val/`` and
  says so);
* ``data_dir/<class>/*.txt``: one folder, split per class into train/val/test by fractions and a seed.

Class names are the folder names of the training files, sorted (as strings, like image folders), and known before
``setup``; label ``i`` is ``class_names[i]``. Files that are not ``.txt``, not UTF-8 or empty are skipped with one
warning that names them; no class folders, a single class, or a class folder without a usable file is an error that
names the folder. Tokenization, caching, batches, samplers and cross-validation are those of
:class:`TextClassificationDataModule`: this module only reads the rows (its ``load_splits``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from datamodules.image_folder import Sample, list_class_folders, split_per_class
from datamodules.text_classification import Row, TextClassificationDataModule


def read_text(path: Path) -> tuple[str, str | None]:
    """``(text, None)`` with the text stripped (a BOM dropped), or ``("", why)`` for a file to skip."""
    if path.suffix.lower() != ".txt":
        return "", "not .txt"
    try:
        text = path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        return "", f"not UTF-8 at byte {err.start}"
    return text, None if text else "empty"


def scan_text_folders(
    root: Path, class_names: list[str] | None = None
) -> tuple[list[Sample], dict[Path, str], list[str], list[str]]:
    """Read the ``.txt`` files of ``root/<class>/**``.

    Args:
        root: folder holding one sub-folder per class.
        class_names: the classes of the training folder; None takes them from ``root`` (sorted), and then every
            class folder must hold a usable file. With them given, a folder not among them is an error.

    Returns:
        ``(path, class index)`` samples, each path's text, the class names, and the skipped files with the reason.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"text folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"no class folders in {root}: expected {root}/<class name>/<file>.txt")
    names = [p.name for p in folders] if class_names is None else class_names
    index = {name: i for i, name in enumerate(names)}
    samples: list[Sample] = []
    texts: dict[Path, str] = {}
    skipped: list[str] = []
    for folder in folders:
        if folder.name not in index:
            raise ValueError(f"class folder {folder} is not one of the training classes {names}")
        found = 0
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            text, why = read_text(path)
            if why:
                skipped.append(f"{path} ({why})")
                continue
            samples.append((path, index[folder.name]))
            texts[path] = text
            found += 1
        if not found and class_names is None:
            raise ValueError(f"class folder {folder} has no usable .txt file: remove it or add UTF-8 text files")
    return samples, texts, names, skipped


class TextFolderDataModule(TextClassificationDataModule):
    """Documents in class folders (see the module docstring for the two layouts).

    Args:
        data_dir: root folder of the data set.
        val_fraction: share of each class held out for validation when there is no ``val/`` folder.
        test_fraction: share of each class held out for testing when the folder is not split at all.
        seed: seed of those splits.
        tokenizer: the model's encoder name (``all-minilm-l6-v2``, ``bert-tiny``, a hub name or a folder).
        max_length: longest document in tokens; longer ones are truncated (256: documents outrun sentences, and
            all-MiniLM-L6-v2 was trained at that length).
        batch_size: batch size of every loader.
        group_by_length: batch training documents of similar length together (less padding).
        cache_dir: where tokenized splits are cached.
        num_workers: data-loader workers (the data is in memory: 0 is usually fastest).
        max_train_samples: keep only this many training documents (a seeded sample), for quick runs.
        num_folds: cross-validation (``make cv``): folds of the training and validation documents (never the test
            documents), stratified by class and seeded.
        fold: the fold that is the validation split (0 to ``num_folds - 1``).
    """

    def __init__(
        self,
        data_dir: str,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        tokenizer: str = "all-minilm-l6-v2",
        max_length: int = 256,
        batch_size: int = 32,
        group_by_length: bool = True,
        cache_dir: str = ".cache/tokenized",
        num_workers: int = 0,
        max_train_samples: int | None = None,
        num_folds: int | None = None,
        fold: int | None = None,
    ):
        super().__init__(
            data_dir=data_dir,
            val_file=None,
            text_column="text",
            label_column="label",
            tokenizer=tokenizer,
            max_length=max_length,
            batch_size=batch_size,
            group_by_length=group_by_length,
            val_fraction=val_fraction,
            seed=seed,
            cache_dir=cache_dir,
            num_workers=num_workers,
            max_train_samples=max_train_samples,
            num_folds=num_folds,
            fold=fold,
        )
        self.options.update(test_fraction=test_fraction)

    @property
    def class_names(self) -> list[str] | None:
        """The class folders' names, sorted: known before ``setup`` (the CLI builds the model with them), from a
        listing of the training folder; ``setup`` checks that each holds a usable file."""
        if self._class_names is None:
            self._class_names = list_class_folders(self.options.data_dir)
        return self._class_names or None

    @class_names.setter
    def class_names(self, names: list[str] | None) -> None:
        self._class_names = names

    def _label_names(self, rows: list[Row]) -> list[str]:
        """Every class folder (read by ``load_splits``), even one that a fold or ``max_train_samples`` left out of
        the training rows: the labels are the folders, not the labels seen."""
        return list(self.class_names or [])

    def load_splits(self) -> dict[str, tuple[list[Row], str]]:
        """The documents of each split as ``{"text", "label"}`` rows that know their file (for messages)."""
        hp = self.options
        root = Path(hp.data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.data_dir {root} does not exist")
        train_dir = root / "train" if (root / "train").is_dir() else root
        samples, texts, names, skipped = scan_text_folders(train_dir)
        self.class_names = names
        if len(names) < 2:
            raise ValueError(
                f"{train_dir} has one class folder ({names[0]!r}): a classifier needs at least two, "
                f"as {train_dir}/<class>/*.txt"
            )
        parts: dict[str, list[Sample]] = {}
        where = {split: f"{train_dir} ({split} split)" for split in ("train", "val", "test")}
        for split in ("val", "test") if train_dir != root else ():  # already split: the folders as they are
            if (root / split).is_dir():
                parts[split], more, _, bad = scan_text_folders(root / split, names)
                texts.update(more)
                skipped += bad
                where[split] = str(root / split)
        held_out = [split for split in ("val", "test") if split not in parts and (split == "val" or train_dir == root)]
        fractions = [hp[f"{split}_fraction"] for split in held_out]
        parts["train"], *split_off = split_per_class(samples, fractions, hp.seed)  # stratified, seeded
        parts |= dict(zip(held_out, split_off, strict=True))
        if "test" not in parts:
            warnings.warn(f"{root} has no test/ folder: the test stage evaluates on the validation files", stacklevel=2)
        if skipped:
            shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            warnings.warn(f"skipped {len(skipped)} file(s) in {root}: {shown}", stacklevel=2)
        if hp.num_folds and not parts["val"]:
            del parts["val"]  # the folds cut train + val: an empty val split loses nothing
        for split, part in parts.items():
            if not part:
                fix = f"raise data.{split}_fraction or " if split in held_out else ""
                raise ValueError(f"{where[split]} is empty: {fix}add .txt files")
        return {
            split: ([Row({"text": texts[p], "label": names[y]}, str(p)) for p, y in part], where[split])
            for split, part in parts.items()
        }
