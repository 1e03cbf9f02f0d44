"""Raw text for masked-language-model pre-training: text files with one document (or sentence) per line.

* ``files``: ``.txt`` files (a line is a document), or CSV/TSV/JSON/JSONL files whose ``text_column`` holds the
  documents; none: the chat lines of the PyPI package ``chatterbot-corpus`` (offline).
* Each document is tokenized once; one longer than ``max_length`` becomes several sequences (no text is lost).
* Masking is transformers' ``DataCollatorForLanguageModeling`` (BERT's recipe: ``mlm_probability`` of the tokens
  are chosen, of those 80% become ``[MASK]``, 10% a random token, 10% stay; special tokens and padding never).
  Training batches are masked afresh every epoch; the validation batches are masked once, with ``seed``, so the
  validation loss of every epoch is measured on the same task.
* ``prepare_data`` (once per node under DDP) only fetches the tokenizer (a hub name is downloaded there, once); the
  documents are tokenized in ``setup`` by every rank and not cached (each rank holds its own copy of the sequences).

Bad input: a missing file, a missing column (named with the columns that exist) and a corpus with no text are
errors; empty lines are skipped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.folds import check_fold, fold_split
from datamodules.loaders import batches_done, current_epoch, make_loader
from datamodules.text_classification import read_rows
from datamodules.tokenizers import load_tokenizer


def read_documents(path: Path, text_column: str) -> list[str]:
    """The non-empty documents of one file."""
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    if path.suffix.lower() == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: bytes that are not UTF-8 at byte {err.start}") from None
    else:
        rows = read_rows(path)
        if text_column not in rows[0]:
            raise ValueError(f"{path} has no column {text_column!r}; its columns: {', '.join(rows[0])}")
        lines = [row[text_column] for row in rows]
    return [line.strip() for line in lines if line.strip()]


class SequenceDataset(Dataset):
    """Token-id sequences (lists), each with its special-tokens mask."""

    def __init__(self, sequences: list[list[int]], special: list[list[int]]):
        self.sequences, self.special = sequences, special

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.sequences[i], "special_tokens_mask": self.special[i]}


class TextLinesDataModule(LightningDataModule):
    """Documents for MLM pre-training, split into train/val by ``val_fraction`` and ``seed``.

    Args:
        files: text files (``.txt``: one document per line; ``.csv``/``.tsv``/``.json``/``.jsonl``: the
            ``text_column``); None: the chatterbot-corpus chat lines (offline).
        text_column: column of the documents in tabular files.
        tokenizer: the model's encoder name (``all-minilm-l6-v2``, ``bert-tiny``, a hub name or a folder).
        max_length: longest sequence in tokens, special tokens included; longer documents are cut into several.
        mlm_probability: share of the tokens chosen for prediction.
        mask_replace_prob: share of the chosen tokens replaced by ``[MASK]``.
        random_replace_prob: share of the chosen tokens replaced by a random token.
        val_fraction: share of the documents held out for validation.
        max_documents: keep this many documents (a seeded sample), for quick runs.
        seed: seed of the split, the sample and the validation masks.
        batch_size: batch size of every loader.
        num_workers: data-loader workers.
        num_folds: cross-validation (``make cv``): cut the documents into this many folds (seeded).
        fold: the fold that is the validation split.
    """

    def __init__(
        self,
        files: list[str] | None = None,
        text_column: str = "text",
        tokenizer: str = "all-minilm-l6-v2",
        max_length: int = 128,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        val_fraction: float = 0.05,
        max_documents: int | None = None,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        num_folds: int | None = None,
        fold: int | None = None,
    ):
        super().__init__()
        check_fold(fold, num_folds)
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if not 0 < mlm_probability < 1:
            raise ValueError(f"data.mlm_probability must be in (0, 1), got {mlm_probability}")
        if max_length < 8:
            raise ValueError(f"data.max_length must be at least 8 tokens, got {max_length}")
        self.save_hyperparameters()
        self.options = self.hparams  # what the model reads (ExtractiveQA and TextClassifier do the same)

    def documents(self) -> list[str]:
        hp = self.hparams
        if hp.files:
            docs = [doc for name in hp.files for doc in read_documents(Path(name), hp.text_column)]
            where = ", ".join(hp.files)
        else:
            from datamodules.chatterbot import corpus_lines

            docs = [line for lines in corpus_lines().values() for line in lines]
            where = "chatterbot-corpus"
        if len(docs) < 2:
            raise ValueError(f"{where}: {'no text' if not docs else 'one document'}; train and val need two or more")
        if hp.max_documents is not None and hp.max_documents < len(docs):
            keep = torch.randperm(len(docs), generator=torch.Generator().manual_seed(hp.seed))[: hp.max_documents]
            docs = [docs[i] for i in sorted(keep.tolist())]
        return docs

    def collator(self, seed: int | None = None):
        from transformers import DataCollatorForLanguageModeling

        hp = self.hparams
        return DataCollatorForLanguageModeling(
            self.tokenizer,
            mlm_probability=hp.mlm_probability,
            mask_replace_prob=hp.mask_replace_prob,
            random_replace_prob=hp.random_replace_prob,
            seed=seed,
        )

    def encode(self, docs: list[str]) -> SequenceDataset:
        """Tokenize ``docs``; one longer than ``max_length`` becomes several sequences."""
        encoded = self.tokenizer(
            docs,
            truncation=True,
            max_length=self.hparams.max_length,
            return_overflowing_tokens=True,  # the rest of a long document: further sequences
            return_special_tokens_mask=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        sequences, special = encoded["input_ids"], encoded["special_tokens_mask"]
        return SequenceDataset(sequences, special)

    def prepare_data(self) -> None:
        """Fetch the tokenizer once per node (Lightning: local rank 0, before ``setup`` on every rank): a hub name is
        downloaded here, and ``setup`` reads it from the hub's cache. Nothing is kept: ``setup`` loads it again."""
        load_tokenizer(self.hparams.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer)
        docs = self.documents()
        if hp.get("num_folds"):  # cross-validation: folds of the documents
            train, val = fold_split(len(docs), hp.num_folds, hp.fold, hp.seed, where="the documents")
            self.fold = hp.fold
        else:
            order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(hp.seed)).tolist()
            n_val = min(max(1, round(len(docs) * hp.val_fraction)), len(docs) - 1)
            train, val = order[n_val:], order[:n_val]
        self.train_set = self.encode([docs[i] for i in train])
        val_set = self.encode([docs[i] for i in val])
        # Masked once, with a fixed seed: each epoch's validation loss scores the same masked tokens.
        masker = self.collator(seed=hp.seed)
        self.val_batches = [
            masker([val_set[j] for j in range(i, min(i + hp.batch_size, len(val_set)))])
            for i in range(0, len(val_set), hp.batch_size)
        ]

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return make_loader(
            self.train_set,
            hp.batch_size,
            hp.num_workers,
            shuffle=True,
            epoch=current_epoch(self.trainer),
            skip_batches=batches_done(self.trainer),
            collate_fn=self.collator(),
        )

    def val_dataloader(self) -> DataLoader:
        # The batches are ready: batch_size=None hands them over one by one.
        return DataLoader(self.val_batches, batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
