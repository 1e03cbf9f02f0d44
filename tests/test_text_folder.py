"""Text folders (``data_dir/<class>/*.txt``): classes from folders, split folders used as they are or a stratified
split, bad files skipped by name, cross-validation folds, a training step, and the original texts in
``test_samples.csv``."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.loggers import CSVLogger

from callbacks.tracking import RunReport
from datamodules.text_folder import TextFolderDataModule
from modules.text_classifier import TextClassifier

WORDS = {"birds": "wings feathers nest", "cars": "engine wheels road", "fish": "fins water gills"}


def write_docs(root: Path, per_class: int, classes: dict[str, str] = WORDS) -> Path:
    for name, words in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i:02d}.txt").write_text(f"Document {i} about {words}.\nA second line.", encoding="utf-8")
    return root


def _data(root: Path, **kwargs) -> TextFolderDataModule:
    options = dict(tokenizer="bert-tiny", batch_size=4, max_length=32, cache_dir=str(root.parent / "cache"))
    dm = TextFolderDataModule(str(root), **(options | kwargs))
    dm.setup("fit")
    return dm


def _labels(dm: TextFolderDataModule, split: str) -> Counter:
    return Counter(row["label"] for row in dm.rows[split])


def test_classes_from_folders_and_a_stratified_seeded_split(tmp_path: Path) -> None:
    root = write_docs(tmp_path / "docs", 10)
    early = TextFolderDataModule(str(root))  # known before setup: the CLI builds the model with them
    assert early.class_names == ["birds", "cars", "fish"] and early.num_classes == 3
    dm = _data(root, val_fraction=0.2, test_fraction=0.3, max_train_samples=4)
    assert dm.class_names == ["birds", "cars", "fish"] and dm.num_classes == 3  # all folders, even if unsampled
    dm = _data(root, val_fraction=0.2, test_fraction=0.3)
    assert _labels(dm, "train") == dict.fromkeys(WORDS, 5)
    assert _labels(dm, "val") == dict.fromkeys(WORDS, 2) and _labels(dm, "test") == dict.fromkeys(WORDS, 3)
    files = {split: {row.at for row in dm.rows[split]} for split in ("train", "val", "test")}
    assert not files["train"] & files["val"] and not files["train"] & files["test"] and not files["val"] & files["test"]
    again = _data(tmp_path / "docs", val_fraction=0.2, test_fraction=0.3)
    other = _data(tmp_path / "docs", val_fraction=0.2, test_fraction=0.3, seed=1)
    assert [r.at for r in again.rows["val"]] == [r.at for r in dm.rows["val"]] != [r.at for r in other.rows["val"]]
    assert dm.rows["train"][0]["text"].startswith("Document ") and "\n" in dm.rows["train"][0]["text"]
    batch = next(iter(dm.train_dataloader()))
    assert {"input_ids", "attention_mask", "token_type_ids", "labels"} <= set(batch) and batch["labels"].shape == (4,)
    with pytest.raises(ValueError, match=r"docs \(val split\) is empty: raise data.val_fraction or add \.txt files"):
        _data(tmp_path / "docs", val_fraction=0.01)


def test_split_folders_are_used_as_they_are(tmp_path: Path) -> None:
    root = tmp_path / "split"
    for split, count in (("train", 4), ("val", 2), ("test", 3)):
        write_docs(root / split, count)
    dm = _data(root)
    for split, count in (("train", 4), ("val", 2), ("test", 3)):
        assert _labels(dm, split) == dict.fromkeys(WORDS, count)
        assert all(Path(row.at).is_relative_to(root / split) for row in dm.rows[split])
    assert not dm.test_is_val
    (root / "test" / "fish" / "00.txt").rename(root / "test" / "fish" / "00.md")
    for doc in (root / "test").rglob("*.txt"):
        doc.unlink()
    with pytest.raises(ValueError, match=r"split/test is empty: add \.txt files"):
        _data(root)


def test_without_test_folder_the_val_folder_is_tested_with_a_warning(tmp_path: Path) -> None:
    root = tmp_path / "split"
    write_docs(root / "train", 6)
    write_docs(root / "val", 2)
    with pytest.warns(UserWarning, match="has no test/ folder"):
        dm = _data(root)
    assert dm.test_is_val and dm.rows["test"] is dm.rows["val"]


def test_bad_files_are_skipped_with_one_warning_that_names_them(tmp_path: Path) -> None:
    root = write_docs(tmp_path / "docs", 6)
    (root / "cars" / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "fish" / "blank.txt").write_text("  \n\n", encoding="utf-8")
    (root / "fish" / "notes.md").write_text("not a document", encoding="utf-8")
    (root / "fish" / ".hidden.txt").write_text("editor swap file", encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped 3 file") as caught:
        dm = _data(root)
    message = " ".join(str(w.message) for w in caught if "skipped" in str(w.message))
    assert "latin1.txt (not UTF-8" in message and "blank.txt (empty)" in message and "notes.md (not .txt)" in message
    kept = {Path(r.at).name for split in ("train", "val", "test") for r in dm.rows[split]}
    assert len(kept) == 6 and not kept & {"latin1.txt", "blank.txt", "notes.md", ".hidden.txt"}


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"only": "one class here"}, r"has one class folder \('only'\): a classifier needs at least two"),
        ({}, r"no class folders in .*: expected .*/<class name>/<file>\.txt"),
    ],
)
def test_one_class_or_no_class_folders_is_a_one_line_error(tmp_path: Path, layout: dict, message: str) -> None:
    root = write_docs(tmp_path / "docs", 3, layout)
    root.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match=message) as error:
        _data(root)
    assert "\n" not in str(error.value) and str(root) in str(error.value)


def test_folds_are_disjoint_and_leave_the_test_split_alone(tmp_path: Path) -> None:
    root = write_docs(tmp_path / "docs", 10)
    folds = [_data(root, num_folds=3, fold=k) for k in range(3)]
    vals = [{r.at for r in dm.rows["val"]} for dm in folds]
    tests = {r.at for r in folds[0].rows["test"]}
    pool = {r.at for r in folds[0].rows["train"]} | vals[0]
    assert not vals[0] & vals[1] and not vals[0] & vals[2] and not vals[1] & vals[2]
    assert set().union(*vals) == pool and not pool & tests and len(pool) + len(tests) == 30
    assert all(Counter(label for _, label in dm.val_keys) == dict.fromkeys(WORDS, 3) for dm in folds[:2])


def test_one_training_step_through_the_text_classifier(tmp_path: Path) -> None:
    torch.manual_seed(0)
    root = write_docs(tmp_path / "docs", 5)
    options = dict(val_fraction=0.2, test_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    dm = TextFolderDataModule(str(root), tokenizer="bert-tiny", batch_size=4, **options)
    model = TextClassifier("bert-tiny", num_classes=dm.num_classes, class_names=dm.class_names)
    trainer = Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 1 and model.hparams.class_names == ["birds", "cars", "fish"]
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_test_samples_csv_holds_the_original_texts(tmp_path: Path) -> None:
    classes = {"happy": "GREAT, Wonderful!", "sad": "Awful... TERRIBLE?!"}
    root = tmp_path / "split"
    write_docs(root / "train", 3, classes)
    write_docs(root / "val", 1, classes)
    originals = {"happy": "Café Crème: «Très Bien»!", "sad": "What a LET-DOWN... (Never again)"}
    for name, text in originals.items():
        (root / "test" / name).mkdir(parents=True)
        (root / "test" / name / "doc.txt").write_text(text, encoding="utf-8")
    # max_length 128: the model's (a Trainer with a logger refuses hyperparameters that differ between the two)
    dm = TextFolderDataModule(str(root), tokenizer="bert-tiny", max_length=128, cache_dir=str(tmp_path / "cache"))
    trainer = Trainer(
        accelerator="cpu",
        logger=CSVLogger(tmp_path / "runs"),
        callbacks=[RunReport()],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(TextClassifier("bert-tiny", num_classes=2, class_names=dm.class_names), dm)
    with (Path(trainer.log_dir) / "test_samples.csv").open(newline="", encoding="utf-8") as f:
        shown = {row["true"]: row["text"] for row in csv.DictReader(f)}
    assert shown == originals  # the uncased tokenizer decodes "cafe creme : « tres bien » !"
