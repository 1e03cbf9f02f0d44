"""Text classification data: CSV, TSV, JSON or JSONL files (or a Hugging Face dataset), tokenized once and cached.

* Columns are configurable: the text, an optional second text (sentence pairs) and the label (names or integers).
  The label set comes from the training split, sorted (numerically when every label is an integer), and is saved with
  the checkpoint through the model's ``class_names``.
* Tokenization runs once per file content, tokenizer and ``max_length``, in ``prepare_data``: once per node under
  DDP (Lightning calls it on local rank 0), which downloads what it needs (a Hugging Face dataset, a hub tokenizer)
  and writes the token ids of each split under ``cache_dir``. ``setup`` then loads them on every rank (memory-mapped:
  the ranks of a node share one copy) and tokenizes only a split missing from the cache (``setup`` called without
  ``prepare_data``). Later runs reuse the cache too; a changed file, tokenizer or length is a different key
  (``datamodules/token_cache.py``).
* Batches are padded to their longest sequence, not to ``max_length``; ``group_by_length`` batches texts of similar
  length together for training (transformers' length grouping, drawn from the seed and the epoch), which cuts
  the padding further.

Bad input: a missing column (the error lists the columns that exist), bytes that are not UTF-8 (file and line), an
empty file, and a val/test label unknown to the training split are errors; empty or whitespace-only texts are
skipped with one warning that counts them.

What a text classification data module yields (what ``TextClassifier`` and ``scripts/train.py`` rely on):

* batches: dicts of tensors, ``input_ids`` and ``attention_mask`` ``(B, T)``, ``token_type_ids`` when the tokenizer
  makes them (BERT does, sentence pairs need them), and ``labels``: class indices ``(B,)`` (multi-label: 0/1 floats
  ``(B, C)``);
* ``num_classes`` and ``class_names`` (label ``i`` is ``class_names[i]``; saved with the checkpoint): this module
  knows them after ``setup``; one that knows them before (``text_folder.py`` lists its folders) lets the CLI build
  the model with them;
* ``options["tokenizer"]``: the model's encoder name (``model.encoder``), checked when the model adopts the data,
  since token ids index that encoder's vocabulary.

Your own rows in the fewest lines: subclass this module and override ``load_splits`` to return
``{"train": (rows, where), ...}``, rows being ``{text_column: text, label_column: label}`` dicts and ``where`` a name
for messages; without ``"val"`` it is held out of train, without ``"test"`` the test stage uses val
(``datamodules/text_folder.py``, ``datamodules/chatterbot.py``).
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import torch
from lightning import LightningDataModule
from lightning.fabric.utilities.data import AttributeDict
from torch.utils.data import DataLoader, Dataset

from datamodules.folds import check_fold, fold_split
from datamodules.loaders import EpochSampler, batches_done, current_epoch, make_loader, run_seed
from datamodules.token_cache import digest, load_entry, save_entry, tokenizer_identity
from datamodules.tokenizers import load_tokenizer


class Row(dict):
    """One record of a data file, column -> text, that knows where it was read (``at``: ``"line 12"``), for
    messages that name the row."""

    __slots__ = ("at",)

    def __init__(self, fields: dict, at: str = ""):
        super().__init__(fields)
        self.at = at


TSV_RULE = (
    "TSV fields are separated by tabs and never quoted (SST-2 style), so a text cannot hold a tab: "
    "write such data as .csv, whose fields may be quoted"
)


def _parse_json_line(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} line {number}: a JSON {type(record).__name__}, not an object of fields")
    return record


def _delimited(path: Path, text: str, column_names: list[str] | None) -> list[Row]:
    tsv = path.suffix.lower() == ".tsv"
    # TSV: no quoting (SST-2 sentences hold bare quotes); CSV: standard quoting (a field may hold commas, newlines).
    reader = csv.reader(io.StringIO(text), **({"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}))
    header, rows = column_names, []
    while True:
        first_line = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise ValueError(f"{path} line {first_line}: {err}") from None
        if not record:
            continue
        if header is None:
            header = record
            continue
        if len(record) != len(header):
            rule = f"; {TSV_RULE}" if tsv and len(record) > len(header) else ""
            raise ValueError(
                f"{path} line {first_line}: {len(record)} field(s) where the header has {len(header)} "
                f"({', '.join(header)}){rule}"
            )
        rows.append(Row(zip(header, record, strict=True), f"line {first_line}"))
    return rows


def read_rows(path: Path, column_names: list[str] | None = None) -> list[Row]:
    """Read a CSV, TSV, JSON (a list of objects) or JSONL file into rows of strings keyed by column name.

    Every CSV/TSV line must have as many fields as the header: CSV fields may be quoted; TSV fields never are, so
    a TSV text cannot hold a tab. A line with the wrong number of fields, a JSONL line that is not a JSON object and
    bytes that are not UTF-8 are errors naming the file and line.

    Args:
        path: the file; its suffix picks the format.
        column_names: names for the columns of a CSV/TSV file that has no header row.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{path} line {line}: bytes that are not UTF-8 ({data[err.start : err.start + 4]!r})"
        ) from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        rows = _delimited(path, text, column_names)
    elif suffix == ".jsonl":
        lines = enumerate(text.splitlines(), 1)
        rows = [Row(_parse_json_line(path, n, line), f"line {n}") for n, line in lines if line.strip()]
    elif suffix == ".json":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
        items = loaded.get("data", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise ValueError(f'{path}: expected a JSON list of objects (or {{"data": [...]}})')
        rows = [Row(item, f"item {i}") for i, item in enumerate(items, 1)]
    else:
        raise ValueError(f"{path}: unknown format {suffix!r}; use .csv, .tsv, .json or .jsonl")
    if not rows:
        raise ValueError(f"{path} has no data rows")
    return [Row({k: ("" if v is None else str(v)) for k, v in row.items()}, row.at) for row in rows]


def _at(row: dict) -> str:
    return getattr(row, "at", "") or "row"


def _warn_skipped(where: str, rows: list, kept: list, why: str) -> None:
    """One warning that counts the rows dropped from ``rows`` (those not in ``kept``) and names the first few."""
    if len(kept) == len(rows):
        return
    kept_ids = {id(r) for r in kept}
    dropped = [_at(r) for r in rows if id(r) not in kept_ids]
    shown = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
    warnings.warn(f"{where}: skipped {len(dropped)} row(s) with {why} ({shown})", stacklevel=3)


def sample_rows(rows: list[Row], count: int, seed: int) -> list[Row]:
    """A seeded sample of ``count`` rows, in their original order (all of them if there are fewer)."""
    if count >= len(rows):
        return rows
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    return [rows[i] for i in sorted(order[:count].tolist())]


class TokenizedDataset(Dataset):
    """Token ids held as one flat tensor with offsets (compact to cache), and labels."""

    def __init__(self, flat: dict[str, torch.Tensor], offsets: torch.Tensor, labels: torch.Tensor):
        self.flat, self.offsets, self.labels = flat, offsets, labels

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    def __getitem__(self, i: int) -> dict:
        start, end = self.offsets[i].item(), self.offsets[i + 1].item()
        item = {key: values[start:end].tolist() for key, values in self.flat.items()}
        item["labels"] = self.labels[i]
        return item


class TextClassificationDataModule(LightningDataModule):
    """Labelled texts from files in ``data_dir`` (or a Hugging Face dataset), tokenized once (in ``prepare_data``,
    once per node) and cached.

    Counters of what this object did, for tests and logs: ``tokenized`` (splits it tokenized, in ``prepare_data`` or
    in ``setup`` when the cache lacked them) and ``cache_hits`` (splits ``setup`` loaded from the cache).

    Args:
        data_dir: folder of the files; None with ``hf_dataset``.
        train_file: training file name in ``data_dir``.
        val_file: validation file name; None splits ``val_fraction`` off the training file.
        test_file: test file name; None tests on the validation split.
        text_column: column of the text.
        text_pair_column: column of the second text of sentence pairs, or None.
        label_column: column of the label (a name or an integer; several joined by ``label_separator`` when
            ``multi_label``).
        column_names: column names for CSV/TSV files without a header row.
        multi_label: each text has a set of labels.
        label_separator: separator of the labels of one text when ``multi_label``.
        hf_dataset: a Hugging Face ``datasets`` name (``imdb``, ``glue``, ``ag_news``; needs internet).
        hf_config: its configuration (``sst2`` for ``glue``).
        tokenizer: the model's encoder name (``all-minilm-l6-v2``, ``bert-tiny``, a hub name or a folder).
        max_length: longest sequence in tokens; longer texts are truncated.
        batch_size: batch size of every loader.
        group_by_length: batch training texts of similar length together (less padding).
        val_fraction: share of the training file held out when there is no ``val_file``.
        seed: seed of that split.
        cache_dir: where tokenized files are cached.
        num_workers: data-loader workers (the data is in memory: 0 is usually fastest).
        max_train_samples: keep only this many training rows (a seeded sample), for quick runs and benchmarks.
        num_folds: cross-validation (``make cv``): cut the training and validation rows (never the test rows) into
            this many folds, stratified by label and seeded (with ``max_train_samples``: a sample of that many first).
        fold: the fold that is the validation split (0 to ``num_folds - 1``).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        train_file: str = "train.tsv",
        val_file: str | None = "dev.tsv",
        test_file: str | None = None,
        text_column: str = "sentence",
        text_pair_column: str | None = None,
        label_column: str = "label",
        column_names: list[str] | None = None,
        multi_label: bool = False,
        label_separator: str = "|",
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        tokenizer: str = "all-minilm-l6-v2",
        max_length: int = 128,
        batch_size: int = 32,
        group_by_length: bool = True,
        val_fraction: float = 0.1,
        seed: int = 0,
        cache_dir: str = ".cache/tokenized",
        num_workers: int = 0,
        max_train_samples: int | None = None,
        num_folds: int | None = None,
        fold: int | None = None,
    ):
        check_fold(fold, num_folds)
        # Our own record of these arguments: under LightningCLI, `hparams` holds only those of the class the config
        # names, which for a subclass are not these.
        options = AttributeDict({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        super().__init__()
        self.save_hyperparameters()
        self.options = options
        self._class_names: list[str] | None = None
        self.cache_hits = 0  # splits that setup loaded from the cache
        self.tokenized = 0  # splits this object tokenized (prepare_data, or setup on a cache miss)

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names else None

    def load_splits(self) -> dict[str, tuple[list[Row], str]]:
        """The raw rows of each split with a name for messages; subclasses may read other sources."""
        hp = self.options
        if hp.hf_dataset:
            return self._load_hf()
        if hp.data_dir is None:
            raise ValueError("give data.data_dir (a folder of files) or data.hf_dataset (a Hugging Face dataset name)")
        root = Path(hp.data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.data_dir {root} does not exist")
        splits = {}
        for split, name in (("train", hp.train_file), ("val", hp.val_file), ("test", hp.test_file)):
            if name is not None:
                path = root / name
                if not path.is_file():
                    raise FileNotFoundError(f"data.{split}_file {path} does not exist")
                splits[split] = (read_rows(path, hp.column_names), str(path))
        return splits

    def _load_hf(self) -> dict[str, tuple[list[Row], str]]:
        from datamodules.hub import load_hf_dataset

        hp = self.options
        loaded = load_hf_dataset(hp.hf_dataset, hp.hf_config)
        names = getattr(loaded["train"].features.get(hp.label_column), "names", None)

        def rows(split: str) -> list[Row]:
            def label(v):
                return names[v] if names and isinstance(v, int) and v >= 0 else v

            return [
                Row({k: str(label(v) if k == hp.label_column else v) for k, v in r.items()}, f"row {i}")
                for i, r in enumerate(loaded[split], 1)
            ]

        splits = {"train": (rows("train"), f"{hp.hf_dataset}:train")}
        if "validation" in loaded:
            splits["val"] = (rows("validation"), f"{hp.hf_dataset}:validation")
        if "test" in loaded:
            test = rows("test")
            if any(r[hp.label_column] != "-1" for r in test):  # GLUE hides its test labels as -1
                splits["test" if "val" in splits else "val"] = (test, f"{hp.hf_dataset}:test")
        return splits

    def prepare_data(self) -> None:
        """Download (a Hugging Face dataset, a hub tokenizer), tokenize each split and write it to ``cache_dir``.

        Lightning calls this once per node (local rank 0), before ``setup`` on every rank. State set here would not
        reach the other processes, so ``setup`` depends on none of it: it finds the cache entries written here (and
        reads the rows itself; the rows read here are only the memo that ``class_names`` keeps too)."""
        tokenizer = load_tokenizer(self.options.tokenizer)
        rows, where = self._read()
        for split, split_rows in rows.items():
            self._encode_labels(split_rows, where[split])  # a bad label fails before any tokenizing
            cache = self._cache_file(split_rows, tokenizer)
            if not cache.is_file():
                save_entry(self._encode(split_rows, tokenizer), cache)
                self.tokenized += 1

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "datasets"):
            return
        self.tokenizer = load_tokenizer(self.options.tokenizer)
        rows, where = self._read()
        self.datasets = {split: self._tokenize(split_rows, where[split]) for split, split_rows in rows.items()}
        self.test_is_val = "test" not in rows
        self.datasets.setdefault("test", self.datasets["val"])
        self.rows = rows | {"test": rows.get("test", rows["val"])}  # the raw rows of each split (scripts/naive.py)

    @property
    def class_names(self) -> list[str] | None:
        """The training labels, sorted (numerically when they are numbers): read with the rows, before ``setup``,
        since the model is built with them (``scripts/train.py`` links them)."""
        if self._class_names is None:
            self._read()
        return self._class_names

    @class_names.setter
    def class_names(self, names: list[str] | None) -> None:
        self._class_names = names

    def _read(self) -> tuple[dict[str, list[Row]], dict[str, str]]:
        """The clean rows of each split (folds, held-out validation and ``max_train_samples`` applied) and a name of
        each for messages; read once, and the class names with them."""
        if getattr(self, "_read_rows", None) is not None:
            return self._read_rows
        hp = self.options
        raw = self.load_splits()
        rows = {split: self._clean(rows, where) for split, (rows, where) in raw.items()}
        if hp.num_folds:
            self._folds(rows, raw)
        elif "val" not in rows:
            rows["train"], rows["val"] = self._split_off(rows["train"])
            raw["val"] = ("", raw["train"][1] + " (held out)")
        if hp.max_train_samples is not None and not hp.num_folds:
            rows["train"] = sample_rows(rows["train"], hp.max_train_samples, hp.seed)
        names = self._label_names(rows["train"])
        if len(names) < 2 and not hp.multi_label:
            raise ValueError(
                f"{raw['train'][1]}: every training row has the label {names[0]!r}; "
                "a classifier needs at least two labels"
            )
        self._class_names = names
        self._read_rows = rows, {split: where for split, (_, where) in raw.items()}
        return self._read_rows

    def _clean(self, rows: list[Row], where: str) -> list[Row]:
        """Rows with every needed field; empty texts and (single-label) empty labels are skipped and counted."""
        hp = self.options
        needed = [c for c in (hp.text_column, hp.text_pair_column, hp.label_column) if c]
        for row in rows:
            missing = [c for c in needed if c not in row]
            if missing:
                raise ValueError(f"{where} {_at(row)}: no {missing[0]!r} field; its fields are {list(row)}")
        kept = [r for r in rows if r[hp.text_column].strip()]
        _warn_skipped(where, rows, kept, f"an empty {hp.text_column!r}")
        if not kept:
            raise ValueError(f"{where}: every row has an empty {hp.text_column!r}")
        if not hp.multi_label:  # an empty label would become a class named ''
            labelled = [r for r in kept if r[hp.label_column].strip()]
            _warn_skipped(where, kept, labelled, f"an empty {hp.label_column!r}")
            if not labelled:
                raise ValueError(f"{where}: every row has an empty {hp.label_column!r}")
            kept = labelled
        return kept

    def _folds(self, rows: dict[str, list[Row]], raw: dict) -> None:
        """Cross-validation: the training and validation rows (``max_train_samples`` of them, when set) cut into
        folds stratified by (first) label; fold ``fold`` validates. The test rows stay out."""
        hp = self.options
        named = [(f"{split} {_at(r)}", r) for split in ("train", "val") for r in rows.get(split, [])]
        if hp.max_train_samples is not None:
            named = sample_rows(named, hp.max_train_samples, hp.seed)
        labels = [(self._labels_of(r) or [""])[0] for _, r in named]
        where = raw["train"][1]
        train, val = fold_split(len(named), hp.num_folds, hp.fold, hp.seed, labels, where=where)
        rows["train"], rows["val"] = [named[i][1] for i in train], [named[i][1] for i in val]
        raw["val"] = ("", f"{where} (fold {hp.fold} of {hp.num_folds})")
        self.val_keys = [(named[i][0], "|".join(self._labels_of(named[i][1]))) for i in val]
        self.fold = hp.fold

    def _split_off(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.options.seed)).tolist()
        count = max(1, round(len(rows) * self.options.val_fraction))
        return [rows[i] for i in order[count:]], [rows[i] for i in order[:count]]

    def _labels_of(self, row: Row) -> list[str]:
        value = row[self.options.label_column].strip()
        if self.options.multi_label:
            return [v.strip() for v in value.split(self.options.label_separator) if v.strip()]
        return [value]

    def _label_names(self, rows: list[Row]) -> list[str]:
        names = {label for row in rows for label in self._labels_of(row)}
        numeric = all(n.lstrip("-").isdigit() for n in names)
        return sorted(names, key=int) if numeric else sorted(names)

    def _encode_labels(self, rows: list[Row], where: str) -> torch.Tensor:
        index = {name: i for i, name in enumerate(self.class_names)}
        encoded = []
        for row in rows:
            labels = self._labels_of(row)
            unknown = [label for label in labels if label not in index]
            if unknown:
                known = self.class_names
                raise ValueError(f"{where} {_at(row)}: label {unknown[0]!r} is not among the training labels {known}")
            encoded.append([index[label] for label in labels])
        if self.options.multi_label:
            targets = torch.zeros(len(rows), len(self.class_names))
            for i, labels in enumerate(encoded):
                targets[i, labels] = 1.0
            return targets
        return torch.tensor([labels[0] for labels in encoded])

    def _cache_key(self, rows: list[Row], tokenizer=None) -> str:
        hp = self.options
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        parts = [*tokenizer_identity(tokenizer), str(hp.max_length), hp.text_column, str(hp.text_pair_column)]
        for row in rows:
            parts.append(row[hp.text_column])
            if hp.text_pair_column:
                parts.append(row[hp.text_pair_column])
        return digest(parts)

    def _cache_file(self, rows: list[Row], tokenizer=None) -> Path:
        return Path(self.options.cache_dir) / f"{self._cache_key(rows, tokenizer)}.pt"

    def _encode(self, rows: list[Row], tokenizer) -> dict:
        """The token ids of ``rows``: one flat int32 tensor per key and the offsets of each text (a cache entry)."""
        hp = self.options
        texts = [r[hp.text_column] for r in rows]
        pairs = [r[hp.text_pair_column] for r in rows] if hp.text_pair_column else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=hp.max_length)
        keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
        lengths = torch.tensor([len(ids) for ids in encoded["input_ids"]])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        flat = {k: torch.tensor([t for seq in encoded[k] for t in seq], dtype=torch.int32) for k in keys}
        return {"flat": flat, "offsets": offsets}

    def _tokenize(self, rows: list[Row], where: str) -> TokenizedDataset:
        """The split's dataset: its cache entry (written by ``prepare_data``), else tokenized here and cached."""
        labels = self._encode_labels(rows, where)
        cache = self._cache_file(rows)
        if cache.is_file():
            stored = load_entry(cache)
            self.cache_hits += 1
        else:
            stored = self._encode(rows, self.tokenizer)
            save_entry(stored, cache)
            self.tokenized += 1
        return TokenizedDataset(stored["flat"], stored["offsets"], labels)

    def texts_of(self, batch: dict[str, torch.Tensor], split: str = "test") -> list[str]:
        """The original texts of a batch of ``split`` (the run's ``test_samples.csv``): decoding its token ids would
        show the tokenizer's view instead (lowercased, accents dropped, spaced punctuation, truncated).

        Each row's unpadded ids are looked up in the split, scanning from its start (where the first test batch is)
        until all are found; identical ids give the first such text, and ids not in the split are decoded."""
        hp = self.options
        ids = batch["input_ids"].cpu()
        mask = batch["attention_mask"].cpu().bool() if "attention_mask" in batch else ids != self.tokenizer.pad_token_id
        unpadded = [row[keep] for row, keep in zip(ids, mask, strict=True)]
        wanted = {seq.to(torch.int32).numpy().tobytes() for seq in unpadded}
        dataset, rows, texts = self.datasets[split], self.rows[split], {}
        flat, offsets = dataset.flat["input_ids"].numpy(), dataset.offsets.tolist()
        for i in range(len(dataset)):
            if len(texts) == len(wanted):
                break
            key = flat[offsets[i] : offsets[i + 1]].tobytes()
            if key in wanted and key not in texts:
                pair = f" [SEP] {rows[i][hp.text_pair_column]}" if hp.text_pair_column else ""
                texts[key] = rows[i][hp.text_column] + pair
        return [
            texts.get(seq.to(torch.int32).numpy().tobytes()) or self.tokenizer.decode(seq, skip_special_tokens=True)
            for seq in unpadded
        ]

    def _collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        labels = torch.stack([f.pop("labels") for f in features])
        batch = self.collator(features)
        batch["labels"] = labels
        return batch

    @property
    def collator(self):
        if not hasattr(self, "_collator"):
            from transformers import DataCollatorWithPadding

            self._collator = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")
        return self._collator

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        hp = self.options
        dataset = self.datasets[split]
        sampler = None  # training without length grouping: make_loader's shuffled EpochSampler
        if train and hp.group_by_length:
            from transformers.trainer_pt_utils import get_length_grouped_indices

            lengths = dataset.lengths()  # transformers' grouping, drawn from (seed, epoch) like every training order
            sampler = EpochSampler(
                len(dataset), run_seed(), order=lambda g: get_length_grouped_indices(lengths, hp.batch_size, None, g)
            )
        return make_loader(
            dataset,
            hp.batch_size,
            hp.num_workers,
            shuffle=train,
            epoch=current_epoch(self.trainer),
            sampler=sampler,
            skip_batches=batches_done(self.trainer),
            collate_fn=self._collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
