"""Extractive question answering data: SQuAD v1.1 / v2.0 JSON files (or ``squad`` / ``squad_v2`` from Hugging Face
``datasets``), cut into overlapping token windows.

* A question and its context become one or more windows of at most ``max_length`` tokens (question first, then a
  piece of the context); consecutive windows share ``doc_stride`` context tokens, so every answer lies whole inside
  at least one window whatever the context's length.
* Training targets are the token positions of the answer's first and last token in each window; a window that does
  not hold the whole answer, and an impossible question (v2.0), point at the first token (CLS).
* Every window keeps its question's index and the character offsets of its context tokens (-1 elsewhere), so the
  model's span can be turned back into text of the original context, and all windows of a question can be pooled
  when it is scored (``modules.qa``).
* The windows are made once per split content, tokenizer and window sizes, in ``prepare_data``: once per node under
  DDP (Lightning calls it on local rank 0), which downloads what it needs (``hf_dataset``, a hub tokenizer) and writes
  each split's windows, packed into flat tensors, under ``cache_dir``. ``setup`` loads them on every rank
  (memory-mapped: the ranks of a node share one copy) and makes only a split missing from the cache (``setup``
  called without ``prepare_data``); later runs reuse the cache (``datamodules/token_cache.py``). Every rank still
  reads the questions themselves, which scoring needs.

Bad input: a file that is not SQuAD JSON, a missing ``context``, ``id``, ``question`` or ``answers`` field (named
with the question id or the article and paragraph), an id used twice and an ``answer_start`` that is not an integer
are errors. An empty question or context is skipped with
a warning that counts them. An ``answer_start`` that does not match the answer text is skipped from training (its
positions would be wrong) and counted in a warning; evaluation keeps such questions, since EM/F1 compare texts.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning import LightningDataModule
from lightning.fabric.utilities.data import AttributeDict
from torch.utils.data import DataLoader, Dataset

from datamodules.folds import check_fold, fold_split
from datamodules.loaders import batches_done, current_epoch, make_loader
from datamodules.text_classification import sample_rows
from datamodules.token_cache import digest, load_entry, save_entry, tokenizer_identity
from datamodules.tokenizers import load_tokenizer

CACHE_FORMAT = "squad-windows-1"  # part of every cache key: a change of the packed layout below is a new key


@dataclass
class QAExample:
    """One question about one context. ``answers``: ``[{"text", "answer_start"}]``, empty when impossible."""

    id: str
    question: str
    context: str
    answers: list[dict] = field(default_factory=list)
    title: str = ""

    @property
    def is_impossible(self) -> bool:
        return not self.answers


def parse_squad(data: dict, where: str, training: bool) -> list[QAExample]:
    """The questions of a SQuAD-format object (``{"data": [article, ...]}``), checked.

    Args:
        data: the loaded JSON.
        where: the file name, for messages.
        training: skip questions whose ``answer_start`` does not match the answer text (their targets would be
            wrong); evaluation keeps them, since EM/F1 compare texts.
    """
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise ValueError(f"{where}: not a SQuAD file (no 'data' list of articles at the top level)")
    examples: list[QAExample] = []
    seen: dict[str, str] = {}
    empty = mismatched = 0
    for a, article in enumerate(articles):
        title = article.get("title", f"article {a}")
        if "paragraphs" not in article:
            raise ValueError(f"{where}: article {title!r} has no 'paragraphs' field")
        for p, paragraph in enumerate(article["paragraphs"]):
            if "context" not in paragraph:
                raise ValueError(f"{where}: article {title!r} paragraph {p} has no 'context' field")
            context = paragraph["context"]
            for q, qa in enumerate(paragraph.get("qas", [])):
                if "id" not in qa:
                    raise ValueError(f"{where}: article {title!r} paragraph {p} question {q} has no 'id' field")
                qid = str(qa["id"])
                if qid in seen:  # answers are scored by id: a second question with it would go unscored
                    raise ValueError(
                        f"{where}: question id {qid!r} is used twice (articles {seen[qid]!r} and {title!r})"
                    )
                seen[qid] = title
                if "question" not in qa:
                    raise ValueError(f"{where}: question {qid!r} has no 'question' field")
                impossible = bool(qa.get("is_impossible", False))
                if "answers" not in qa and not impossible:
                    raise ValueError(f"{where}: question {qid!r} has no 'answers' field (and is not is_impossible)")
                if not qa["question"].strip() or not context.strip():
                    empty += 1
                    continue
                answers = [] if impossible else list(qa["answers"])
                for answer in answers:
                    if "text" not in answer or "answer_start" not in answer:
                        raise ValueError(f"{where}: question {qid!r} has an answer without 'text' or 'answer_start'")
                    start = answer["answer_start"]
                    if not isinstance(start, int) or isinstance(start, bool):
                        raise ValueError(
                            f"{where}: question {qid!r} has answer_start {start!r}, not an integer character offset"
                        )
                if training and answers:
                    start, text = answers[0]["answer_start"], answers[0]["text"]
                    if context[start : start + len(text)] != text:
                        mismatched += 1
                        continue
                examples.append(QAExample(qid, qa["question"], context, answers, title))
    if empty:
        warnings.warn(f"{where}: skipped {empty} question(s) with an empty question or context", stacklevel=2)
    if mismatched:
        warnings.warn(
            f"{where}: skipped {mismatched} training question(s) whose answer_start does not point at the answer text",
            stacklevel=2,
        )
    return examples


def read_squad(path: Path, training: bool = False) -> list[QAExample]:
    """The questions of a SQuAD JSON file (see :func:`parse_squad`)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
    return parse_squad(data, str(path), training)


def shorten_questions(tokenizer, questions: list[str], max_query_length: int) -> list[str]:
    """Cut questions longer than ``max_query_length`` tokens at a token boundary (as BERT's run_squad does)."""
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for question, offsets in zip(questions, encoded["offset_mapping"], strict=True):
        out.append(question if len(offsets) <= max_query_length else question[: offsets[max_query_length - 1][1]])
    return out


def make_windows(
    tokenizer,
    questions: list[str],
    contexts: list[str],
    max_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    answers: list[dict | None] | None = None,
) -> list[dict]:
    """Cut each (question, context) pair into windows of at most ``max_length`` tokens.

    Args:
        tokenizer: a fast tokenizer (it must give offset mappings) that puts the question first and pads right.
        questions: the questions.
        contexts: their contexts.
        max_length: tokens per window, question and special tokens included.
        doc_stride: context tokens shared by consecutive windows (transformers' ``stride``, as in its run_qa.py).
        max_query_length: questions longer than this many tokens are cut.
        answers: per question, the answer ``{"text", "answer_start"}`` to target, or None (impossible); omitted:
            no targets.

    Returns:
        One dict per window: ``input_ids`` (and ``token_type_ids``), ``example_index`` (into ``questions``),
        ``offsets`` (``(start, end)`` character offsets into the context, ``(-1, -1)`` for tokens outside it), and
        with ``answers`` also ``start_positions`` / ``end_positions`` (0, the CLS token, when the window does not
        hold the whole answer).
    """
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: QA windows need its offset mappings")
    if tokenizer.padding_side != "right":
        raise ValueError("QA windows expect a tokenizer that pads on the right with the question first")
    room = max_length - max_query_length - tokenizer.num_special_tokens_to_add(pair=True)
    if not 0 <= doc_stride < room:
        raise ValueError(
            f"data.doc_stride is {doc_stride} but must be below the context room of a window, "
            f"{room} tokens (max_length {max_length} - max_query_length {max_query_length} - special tokens)"
        )
    questions = shorten_questions(tokenizer, [q.lstrip() for q in questions], max_query_length)
    encoded = tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
    windows = []
    for i, example in enumerate(encoded["overflow_to_sample_mapping"]):
        sequence_ids = encoded.sequence_ids(i)
        offsets = [
            tuple(o) if s == 1 else (-1, -1) for o, s in zip(encoded["offset_mapping"][i], sequence_ids, strict=True)
        ]
        window = {k: encoded[k][i] for k in keys} | {"example_index": example, "offsets": offsets}
        if answers is not None:
            window["start_positions"], window["end_positions"] = _answer_positions(offsets, answers[example])
        windows.append(window)
    return windows


def _answer_positions(offsets: list[tuple[int, int]], answer: dict | None) -> tuple[int, int]:
    """Token positions of the answer's first and last token in a window, or (0, 0) if the window lacks it."""
    if answer is None:
        return 0, 0
    start_char = answer["answer_start"]
    end_char = start_char + len(answer["text"])
    context = [i for i, (s, _) in enumerate(offsets) if s >= 0]
    first, last = context[0], context[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return 0, 0
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def pack_windows(windows: list[dict]) -> dict:
    """The windows of :func:`make_windows` as flat tensors (compact to cache and to hold): ``tokens`` (one flat
    int32 tensor per key), ``offsets`` ``(tokens, 2)`` int32, ``bounds`` (where each window starts, and the end), and
    one value per window for ``example_index`` and, when targeted, ``start_positions`` / ``end_positions``."""
    keys = [k for k in ("input_ids", "token_type_ids") if k in windows[0]]
    lengths = torch.tensor([len(w["input_ids"]) for w in windows])
    packed = {
        "tokens": {k: torch.tensor([t for w in windows for t in w[k]], dtype=torch.int32) for k in keys},
        "offsets": torch.tensor([o for w in windows for o in w["offsets"]], dtype=torch.int32).view(-1, 2),
        "bounds": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
    }
    for key in ("example_index", "start_positions", "end_positions"):
        if key in windows[0]:
            packed[key] = torch.tensor([w[key] for w in windows])
    return packed


class WindowDataset(Dataset):
    """The windows of one split (packed by :func:`pack_windows`) and the questions they come from; an item is a
    window as :func:`make_windows` gives it (``offsets`` as an ``(n, 2)`` tensor) with its ``window_index``."""

    def __init__(self, packed: dict, examples: list[QAExample]):
        self.packed, self.examples = packed, examples

    def __len__(self) -> int:
        return len(self.packed["example_index"])

    def __getitem__(self, i: int) -> dict:
        packed = self.packed
        start, end = packed["bounds"][i].item(), packed["bounds"][i + 1].item()
        window = {k: values[start:end].tolist() for k, values in packed["tokens"].items()}
        window["offsets"] = packed["offsets"][start:end]
        for key in ("example_index", "start_positions", "end_positions"):
            if key in packed:
                window[key] = packed[key][i].item()
        return window | {"window_index": i}


class QACollator:
    """Pads token ids with the tokenizer's collator and the character offsets with -1 (to the same length)."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorWithPadding

        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, windows: list[dict]) -> dict[str, torch.Tensor]:
        tokens = [{k: w[k] for k in ("input_ids", "token_type_ids") if k in w} for w in windows]
        batch = dict(self.pad(tokens))
        length = batch["input_ids"].shape[1]
        offsets = torch.full((len(windows), length, 2), -1, dtype=torch.long)
        for row, window in enumerate(windows):
            offsets[row, : len(window["offsets"])] = torch.as_tensor(window["offsets"])
        batch["offsets"] = offsets
        for key in ("example_index", "window_index", "start_positions", "end_positions"):
            if key in windows[0]:
                batch[key] = torch.tensor([w[key] for w in windows])
        return batch


class SquadDataModule(LightningDataModule):
    """SQuAD-format question answering data cut into token windows, once (in ``prepare_data``, once per node) and
    cached.

    Counters of what this object did, for tests and logs: ``tokenized`` (splits it cut into windows, in
    ``prepare_data`` or in ``setup`` when the cache lacked them) and ``cache_hits`` (splits ``setup`` loaded from the
    cache).

    Args:
        data_dir: folder of the JSON files; None with ``hf_dataset``.
        train_file: training file in ``data_dir``.
        val_file: validation file; None holds out articles of the training file (``holdout_articles``).
        test_file: test file; None tests on the validation questions.
        holdout_articles: titles of the training file's articles to validate (and test) on when there is no
            ``val_file``; None holds out the last article.
        test_articles: titles of the training file's articles to test on (never trained or validated on) when there
            is no ``test_file``; None tests on the validation questions.
        answerable_only: drop impossible questions (SQuAD v1.1-style training and scoring of v2.0 data).
        version_2_with_negative: score the null answer (v2.0); None decides from the data (any impossible question).
        hf_dataset: ``squad`` or ``squad_v2`` from Hugging Face ``datasets`` (needs internet).
        tokenizer: the model's encoder name (``all-minilm-l6-v2``, ``bert-tiny``, a hub name or a folder).
        max_length: tokens per window.
        doc_stride: context tokens shared by consecutive windows of a long context.
        max_query_length: questions are cut to this many tokens.
        batch_size: windows per batch.
        num_workers: data-loader workers (the data is in memory: 0 is usually fastest).
        max_train_samples: keep only this many training questions (a seeded sample), for quick runs.
        seed: seed of that sample and of the folds.
        num_folds: cross-validation (``make cv``): cut the training and validation questions (never the test
            questions) into this many folds by article, so an article's questions are all in one fold.
        fold: the fold that is the validation split (0 to ``num_folds - 1``).
        cache_dir: where the windows of each split are cached.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        train_file: str = "train-v2.0.json",
        val_file: str | None = "dev-v2.0.json",
        test_file: str | None = None,
        holdout_articles: list[str] | None = None,
        test_articles: list[str] | None = None,
        answerable_only: bool = False,
        version_2_with_negative: bool | None = None,
        hf_dataset: str | None = None,
        tokenizer: str = "all-minilm-l6-v2",
        max_length: int = 384,
        doc_stride: int = 128,
        max_query_length: int = 64,
        batch_size: int = 16,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        seed: int = 0,
        num_folds: int | None = None,
        fold: int | None = None,
        cache_dir: str = ".cache/tokenized",
    ):
        check_fold(fold, num_folds)
        options = AttributeDict({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        super().__init__()
        self.save_hyperparameters()
        self.options = options  # see TextClassificationDataModule: hparams of a subclass are not these
        self.cache_hits = 0  # splits that setup loaded from the cache
        self.tokenized = 0  # splits this object cut into windows (prepare_data, or setup on a cache miss)

    def load_splits(self) -> dict[str, list[QAExample]]:
        """The questions of each split; subclasses may read other sources."""
        hp = self.options
        if hp.hf_dataset:
            return self._load_hf()
        if hp.data_dir is None:
            raise ValueError("give data.data_dir (a folder of SQuAD JSON files) or data.hf_dataset (squad, squad_v2)")
        root = Path(hp.data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.data_dir {root} does not exist")

        def read(split: str, name: str, training: bool) -> list[QAExample]:
            path = root / name
            if not path.is_file():
                raise FileNotFoundError(f"data.{split}_file {path} does not exist")
            return read_squad(path, training)

        splits = {"train": read("train", hp.train_file, training=True)}
        if hp.test_articles and hp.test_file is None:
            tested = self._holdout(splits["train"], str(root / hp.train_file), hp.test_articles, "test_articles")
            splits["train"] = [e for e in splits["train"] if e.title not in tested]
            splits["test"] = [e for e in read("train", hp.train_file, training=False) if e.title in tested]
        if hp.val_file is None:
            held = self._holdout(splits["train"], str(root / hp.train_file), hp.holdout_articles, "holdout_articles")
            splits["train"] = [e for e in splits["train"] if e.title not in held]
            # Evaluation keeps questions whose answer_start is off (EM/F1 compare texts): read them again.
            splits["val"] = [e for e in read("train", hp.train_file, training=False) if e.title in held]
        else:
            splits["val"] = read("val", hp.val_file, training=False)
        if hp.test_file is not None:
            splits["test"] = read("test", hp.test_file, training=False)
        return splits

    def _holdout(self, examples: list[QAExample], where: str, titles_held: list[str] | None, key: str) -> set[str]:
        titles = list(dict.fromkeys(e.title for e in examples))
        held = titles_held or titles[-1:]
        unknown = [t for t in held if t not in titles]
        if unknown:
            raise ValueError(f"data.{key} names {unknown}, which are not training articles of {where}: {titles}")
        if set(held) >= set(titles):
            raise ValueError(f"data.{key} holds out every article of {where}: nothing left to train on")
        return set(held)

    def _load_hf(self) -> dict[str, list[QAExample]]:
        from datamodules.hub import load_hf_dataset

        loaded = load_hf_dataset(self.options.hf_dataset)

        def examples(split: str) -> list[QAExample]:
            out = []
            for r in loaded[split]:
                answers = [
                    {"text": t, "answer_start": s}
                    for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"], strict=True)
                ]
                out.append(QAExample(r["id"], r["question"], r["context"], answers, r.get("title", "")))
            return out

        return {"train": examples("train"), "val": examples("validation")}

    def prepare_data(self) -> None:
        """Download (``hf_dataset``, a hub tokenizer), cut each split into windows and write them to ``cache_dir``.

        Lightning calls this once per node (local rank 0), before ``setup`` on every rank. State set here would not
        reach the other processes, so it keeps none: ``setup`` reads the questions again and finds the windows
        written here."""
        tokenizer = load_tokenizer(self.options.tokenizer)
        for examples in self._splits().values():
            cache = self._cache_file(examples, tokenizer)
            if not cache.is_file():
                save_entry(self._make_windows(examples, tokenizer), cache)
                self.tokenized += 1

    def _splits(self) -> dict[str, list[QAExample]]:
        """The questions of each split, with ``answerable_only``, the folds and ``max_train_samples`` applied."""
        hp = self.options
        splits = self.load_splits()
        if hp.answerable_only:
            splits = {name: [e for e in examples if not e.is_impossible] for name, examples in splits.items()}
        if hp.num_folds:  # cross-validation by article: a fold holds whole articles; the test questions stay out
            pool = splits["train"] + splits["val"]
            train, val = fold_split(
                len(pool),
                hp.num_folds,
                hp.fold,
                hp.seed,
                groups=[e.title for e in pool],
                where="the SQuAD training data",
            )
            splits["train"], splits["val"] = [pool[i] for i in train], [pool[i] for i in val]
        if hp.max_train_samples is not None:
            splits["train"] = sample_rows(splits["train"], hp.max_train_samples, hp.seed)
        for name, examples in splits.items():
            if not examples:
                raise ValueError(f"the {name} split has no questions")
        return splits

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "datasets"):
            return
        hp = self.options
        self.tokenizer = load_tokenizer(hp.tokenizer)
        splits = self._splits()
        if hp.num_folds:
            self.fold = hp.fold
        v2 = hp.version_2_with_negative
        self.version_2_with_negative = any(e.is_impossible for ex in splits.values() for e in ex) if v2 is None else v2
        self.datasets = {name: self._windows(examples) for name, examples in splits.items()}
        self.test_is_val = "test" not in self.datasets  # scripts/train.py then tests the last weights, not the best
        self.datasets.setdefault("test", self.datasets["val"])

    def _cache_file(self, examples: list[QAExample], tokenizer) -> Path:
        """The cache entry of a split's windows: keyed by the tokenizer, the window sizes, and each question,
        context and targeted answer, in order."""
        hp = self.options
        parts = [CACHE_FORMAT, *tokenizer_identity(tokenizer), str(hp.max_length), str(hp.doc_stride)]
        parts.append(str(hp.max_query_length))
        for e in examples:
            answer = e.answers[0] if e.answers else None
            parts += [e.question, e.context]
            parts += [answer["text"], str(answer["answer_start"])] if answer else ["", "impossible"]
        return Path(hp.cache_dir) / f"qa-{digest(parts)}.pt"

    def _make_windows(self, examples: list[QAExample], tokenizer) -> dict:
        """The packed windows of a split's questions (a cache entry), targeting each question's first answer."""
        hp = self.options
        answers = [e.answers[0] if e.answers else None for e in examples]
        windows = make_windows(
            tokenizer,
            [e.question for e in examples],
            [e.context for e in examples],
            hp.max_length,
            hp.doc_stride,
            hp.max_query_length,
            answers,
        )
        return pack_windows(windows)

    def _windows(self, examples: list[QAExample]) -> WindowDataset:
        """The split's dataset: its cache entry (written by ``prepare_data``), else made here and cached."""
        cache = self._cache_file(examples, self.tokenizer)
        if cache.is_file():
            packed = load_entry(cache)
            self.cache_hits += 1
        else:
            packed = self._make_windows(examples, self.tokenizer)
            save_entry(packed, cache)
            self.tokenized += 1
        return WindowDataset(packed, examples)

    def examples(self, split: str) -> list[QAExample]:
        """The questions of ``split`` (``val``, ``test``), in the order their windows' ``example_index`` counts."""
        return self.datasets[split].examples

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        hp = self.options
        return make_loader(
            self.datasets[split],
            hp.batch_size,
            hp.num_workers,
            shuffle=train,
            epoch=current_epoch(self.trainer),
            skip_batches=batches_done(self.trainer),
            collate_fn=QACollator(self.tokenizer),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
