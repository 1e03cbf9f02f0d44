"""What every classification module shares: a head sized by the data, the loss, the metrics, the named parameter
groups, and the class names kept with the checkpoint. ``ImageClassifier`` and ``TextClassifier`` add their backbone
and their ``forward``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelF1Score,
)

from callbacks.tracking import run_dir
from modules.finetune import FineTuneModule


class ClassificationHead(nn.Sequential):
    """Dropout + linear, with an optional hidden layer (linear, GELU, dropout) before it.

    Args:
        in_features: width of the backbone's features.
        num_classes: number of output logits.
        hidden_dim: width of an optional hidden layer; None for a single linear layer.
        dropout: dropout probability before each linear layer.
    """

    def __init__(self, in_features: int, num_classes: int, hidden_dim: int | None = None, dropout: float = 0.2):
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden_dim:
            layers += [nn.Linear(in_features, hidden_dim), nn.GELU(), nn.Dropout(dropout)]
            in_features = hidden_dim
        layers.append(nn.Linear(in_features, num_classes))
        super().__init__(*layers)


class Classifier(FineTuneModule):
    """Base class. Subclasses call ``save_hyperparameters`` (with at least ``num_classes``, ``class_names``,
    ``dropout``, ``hidden_dim``, ``label_smoothing``, the LR settings and optionally ``multi_label``), set
    ``backbone``, ``layer_groups``, ``num_features`` and ``optimizer``, call :meth:`init_classes`, and define
    ``forward(inputs) -> logits``; batches are ``(inputs, labels)`` unless :meth:`split_batch` says otherwise.
    """

    def init_classes(self, num_classes: int | None, class_names: list[str] | None) -> None:
        """Build the head now if the number of classes is known, else when the data module tells it (``setup``)."""
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"model.num_classes is {num_classes} but model.class_names has {len(class_names)} names")
        self.head: nn.Module | None = None
        self.val_acc_best = MaxMetric()
        if num_classes is None and class_names is not None:
            num_classes = self.hparams.num_classes = len(class_names)
        if num_classes is not None:
            self._build_head(num_classes)

    @property
    def multi_label(self) -> bool:
        return bool(self.hparams.get("multi_label", False))

    def _build_head(self, num_classes: int) -> None:
        hp = self.hparams
        self.head = ClassificationHead(self.num_features, num_classes, hp.hidden_dim, hp.dropout)
        if self.multi_label:
            metrics = {"acc": MultilabelAccuracy(num_classes), "f1": MultilabelF1Score(num_classes)}
            self.train_acc = MultilabelAccuracy(num_classes)
        else:
            metrics = {"acc": MulticlassAccuracy(num_classes, average="micro"), "f1": MulticlassF1Score(num_classes)}
            if num_classes > 5:
                metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
            self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        # compute_groups=False: torchmetrics merges metrics whose states are equal after the first update, so a
        # first batch with every prediction right would make F1 share top-5 accuracy's counts for the whole epoch.
        self.val_metrics = MetricCollection(metrics, prefix="val/", compute_groups=False)
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        self.test_per_class = (MultilabelF1Score if self.multi_label else MulticlassF1Score)(num_classes, average=None)
        self.test_confusion = None if self.multi_label else MulticlassConfusionMatrix(num_classes)

    def setup(self, stage: str) -> None:
        self.adopt_data(getattr(self.trainer, "datamodule", None))

    def adopt_data(self, datamodule) -> None:
        """Take the number of classes and their names from ``datamodule`` (after its ``setup``), or check them."""
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is None:
            if self.head is None:
                raise ValueError("model.num_classes is not set and the data module does not provide num_classes")
            return
        if self.hparams.num_classes is None:
            self.hparams.num_classes = data_classes
            self._build_head(data_classes)
        elif self.hparams.num_classes != data_classes:
            raise ValueError(
                f"model.num_classes is {self.hparams.num_classes} but the data has {data_classes} classes "
                f"({', '.join(map(str, datamodule.class_names[:10]))}{', ...' if data_classes > 10 else ''}); "
                "remove model.num_classes from the config or make them agree"
            )
        data_names = list(getattr(datamodule, "class_names", None) or [])
        if self.hparams.class_names is None:
            self.hparams.class_names = data_names or None
        elif data_names and list(self.hparams.class_names) != data_names:
            raise ValueError(
                f"the model's class names {self.hparams.class_names} differ from the data's {data_names}: "
                "label indices would not mean the same classes"
            )

    def split_batch(self, batch) -> tuple:
        """``(inputs, labels)`` of a batch."""
        return batch[0], batch[1]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        return F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, labels = self.split_batch(batch)
        logits = self(inputs)
        loss = self.loss(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def on_train_start(self) -> None:
        self.val_acc_best.reset()  # forget the sanity check's accuracy

    def validation_step(self, batch, batch_idx: int) -> None:
        inputs, labels = self.split_batch(batch)
        logits = self(inputs)
        self.log("val/loss", self.loss(logits, labels), prog_bar=True)
        self.val_metrics.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self.val_acc_best(values["val/acc"])
        self.log_dict(values, prog_bar=True)
        self.log("val/acc_best", self.val_acc_best.compute())

    def test_step(self, batch, batch_idx: int) -> None:
        inputs, labels = self.split_batch(batch)
        logits = self(inputs)
        self.log("test/loss", self.loss(logits, labels))
        self.test_metrics.update(logits, labels)
        self.test_per_class.update(logits, labels)
        if self.test_confusion is not None:
            self.test_confusion.update(logits, labels)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()
        names = self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]
        per_class = self.test_per_class.compute()
        self.test_per_class.reset()
        if len(names) <= 50:  # per-class F1 as metrics while it stays readable
            self.log_dict({f"test/f1_{name}": value for name, value in zip(names, per_class, strict=True)})
        if self.test_confusion is None:
            return
        self.confusion_matrix = self.test_confusion.compute().cpu()
        self.test_confusion.reset()
        log_dir = run_dir(self.trainer)
        if log_dir and self.trainer.is_global_zero:
            write_confusion_csv(self.confusion_matrix, self.hparams.class_names, log_dir / "confusion_matrix.csv")

    def label_results(self, probs: torch.Tensor) -> list[dict]:
        """``[{"label": name, "score": p, "probs": {name: p, ...}}, ...]`` for rows of class probabilities.

        For multi-label models ``label`` is the list of names with probability above 0.5.
        """
        names = self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]
        results = []
        for row in probs.tolist():
            scores = dict(zip(names, row, strict=True))
            if self.multi_label:
                results.append({"label": [n for n, p in scores.items() if p > 0.5], "score": max(row), "probs": scores})
            else:
                best = max(range(len(row)), key=row.__getitem__)
                results.append({"label": names[best], "score": row[best], "probs": scores})
        return results

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """``{"pred": class indices (B,), "probs": (B, C)}``; multi-label: ``pred`` is ``probs > 0.5``, (B, C)."""
        inputs = batch[0] if isinstance(batch, list | tuple) else batch
        logits = self(inputs)
        if self.multi_label:
            probs = logits.sigmoid()
            return {"pred": probs > 0.5, "probs": probs}
        probs = logits.softmax(dim=-1)
        return {"pred": probs.argmax(dim=-1), "probs": probs}


def write_confusion_csv(matrix: torch.Tensor, class_names: list[str] | None, path: Path) -> None:
    """Write a confusion matrix (rows: true class, columns: predicted class) as CSV with class-name headers."""
    names = list(class_names) if class_names else [str(i) for i in range(len(matrix))]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *names])
        for name, row in zip(names, matrix.tolist(), strict=True):
            writer.writerow([name, *row])
