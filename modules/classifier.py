"""What every classification module shares: a head sized by the data, the loss, the metrics, the named parameter
groups, the class names kept with the checkpoint, and knowledge distillation from a teacher checkpoint
(``modules/distillation.py``). ``ImageClassifier`` and ``TextClassifier`` add their backbone and their ``forward``.
"""

from __future__ import annotations

import csv
import io

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

from modules.distillation import check_teacher, distillation_loss, load_teacher, teacher_inputs
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
    """Base class of the classification tasks. A subclass takes its backbone's arguments plus ``**kwargs``, builds
    its backbone, calls :meth:`build_head` with the feature width, and defines ``forward(inputs) -> logits``; batches
    are ``(inputs, labels)`` unless :meth:`split_batch` says otherwise.

    Args:
        num_classes: number of classes (``scripts/train.py`` links it from the data module's ``num_classes``).
        class_names: class names in label order, saved with the checkpoint (linked from the data module's
            ``class_names``); given alone, they set ``num_classes``.
        hidden_dim: width of an optional hidden layer in the head.
        dropout: dropout probability in the head.
        label_smoothing: label smoothing of the cross-entropy loss (single-label).
        teacher: a classification checkpoint of this template to distil from (its run's ``config.yaml`` beside it
            names its class): frozen, outside the state dict, the optimizer and DDP, used in ``fit`` only; the
            student's checkpoints do not need it. Same classes; for text, the same tokenizer.
        distill_weight: weight of the distillation term; the task loss gets ``1 - distill_weight``.
        temperature: softmax temperature ``T`` of the distillation term (scaled by ``T²``).
        feature_weight: weight of similarity-preserving feature matching between the two models' pooled features
            (0: off).
        kwargs: the learning-rate and optimizer arguments of :class:`~modules.finetune.FineTuneModule`.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        hidden_dim: int | None = None,
        dropout: float = 0.2,
        label_smoothing: float = 0.0,
        teacher: str | None = None,
        distill_weight: float = 0.5,
        temperature: float = 2.0,
        feature_weight: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0 <= distill_weight <= 1 or temperature <= 0 or feature_weight < 0:
            raise ValueError(
                "distillation needs 0 <= model.distill_weight <= 1, model.temperature > 0 and model.feature_weight "
                f">= 0, got {distill_weight}, {temperature} and {feature_weight}"
            )
        self._teacher: list[nn.Module] = []  # a plain list: not a submodule, so not in the state dict, optimizer or DDP
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"model.num_classes is {num_classes} but model.class_names has {len(class_names)} names")
        if num_classes is None and class_names is not None:
            self.hparams.num_classes = len(class_names)
        if self.hparams.num_classes is None:
            raise ValueError(
                f"{type(self).__name__} needs num_classes or class_names (scripts/train.py links them from the data "
                "module's num_classes and class_names; in Python pass num_classes=datamodule.num_classes)"
            )
        self.val_acc_best = MaxMetric()

    @property
    def multi_label(self) -> bool:
        return bool(self.hparams.get("multi_label", False))

    def build_head(self, num_features: int) -> None:
        """The head on ``num_features`` backbone features, and the metrics for the number of classes."""
        hp, num_classes = self.hparams, self.hparams.num_classes
        self.num_features = num_features
        self.head = ClassificationHead(num_features, num_classes, hp.hidden_dim, hp.dropout)
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
        self.confusion_matrix: torch.Tensor | None = None

    def setup(self, stage: str) -> None:
        # A guard, not a source: the classes come in through the constructor. A checkpoint evaluated on data whose
        # classes are other ones (or in another order) would report a meaningless accuracy.
        data_names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None)
        names = self.hparams.class_names
        if data_names is not None and len(data_names) != self.hparams.num_classes:
            raise ValueError(
                f"model.num_classes is {self.hparams.num_classes} but the data has {len(data_names)} classes "
                f"({', '.join(map(str, list(data_names)[:10]))}{', ...' if len(data_names) > 10 else ''})"
            )
        if data_names is not None and names is not None and list(names) != list(data_names):
            raise ValueError(
                f"the model's class names {list(names)} differ from the data's {list(data_names)}: "
                "label indices would not mean the same classes"
            )
        if stage == "fit" and self.hparams.get("teacher") and not self._teacher:
            teacher = load_teacher(self.hparams.teacher)
            check_teacher(self, teacher, self.hparams.teacher)
            self._teacher.append(teacher)

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher while distilling (loaded at the start of ``fit``), else None."""
        return self._teacher[0] if self._teacher else None

    def on_fit_start(self) -> None:
        if self.teacher is not None:  # on the student's device and dtype; eval mode for good (no dropout, BN frozen)
            self.teacher.to(device=self.device, dtype=self.head[-1].weight.dtype).eval()

    def split_batch(self, batch) -> tuple:
        """``(inputs, labels)`` of a batch."""
        return batch[0], batch[1]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        return F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, labels = self.split_batch(batch)
        if self.teacher is None:
            logits = self(inputs)
            loss = self.loss(logits, labels)
        else:
            logits, loss = self.distillation_step(inputs, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def distillation_step(self, inputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's logits and the distillation loss of a batch (``modules/distillation.py``)."""
        hp, teacher = self.hparams, self.teacher
        match_features = hp.feature_weight > 0
        features = self.features(inputs) if match_features else None
        logits = self.head(features) if match_features else self(inputs)
        with torch.no_grad():
            t_inputs = teacher_inputs(inputs, teacher)
            t_features = teacher.features(t_inputs) if match_features else None
            t_logits = teacher.head(t_features) if match_features else teacher(t_inputs)
        loss, parts = distillation_loss(
            self.loss(logits, labels),
            logits,
            t_logits,
            hp.temperature,
            hp.distill_weight,
            hp.feature_weight,
            features,
            t_features,
        )
        self.log_dict({f"train/{name}_loss": value for name, value in parts.items()})
        return logits, loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # The student stands alone after training: rebuilding it from its checkpoint (eval, predict, export) must not
        # read the teacher again. A resumed fit rebuilds the model from the run's config, which keeps it.
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"]["teacher"] = None

    def on_train_start(self) -> None:
        self.val_acc_best.reset()  # forget the sanity check's accuracy

    def validation_step(self, batch, batch_idx: int) -> None:
        inputs, labels = self.split_batch(batch)
        logits = self(inputs)
        self.log("val/loss", self.loss(logits, labels), prog_bar=True, sync_dist=True)  # every rank's batches
        self.val_metrics.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self.val_acc_best(values["val/acc"])
        # torchmetrics has reduced these over the ranks: sync_dist averages equal values (and keeps Lightning quiet)
        self.log_dict(values, prog_bar=True, sync_dist=True)
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        inputs, labels = self.split_batch(batch)
        logits = self(inputs)
        self.log("test/loss", self.loss(logits, labels), sync_dist=True)
        self.test_metrics.update(logits, labels)
        self.test_per_class.update(logits, labels)
        if self.test_confusion is not None:
            self.test_confusion.update(logits, labels)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()
        names = self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]
        per_class = self.test_per_class.compute()
        self.test_per_class.reset()
        if len(names) <= 50:  # per-class F1 as metrics while it stays readable
            self.log_dict({f"test/f1_{name}": v for name, v in zip(names, per_class, strict=True)}, sync_dist=True)
        if self.test_confusion is None:
            return
        self.confusion_matrix = self.test_confusion.compute().cpu()
        self.test_confusion.reset()

    def test_artifacts(self) -> dict[str, str]:
        if self.confusion_matrix is None:
            return {}
        return {"confusion_matrix.csv": confusion_csv(self.confusion_matrix, self.hparams.class_names)}

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


def confusion_csv(matrix: torch.Tensor, class_names: list[str] | None) -> str:
    """A confusion matrix (rows: true class, columns: predicted class) as CSV text with class-name headers."""
    names = list(class_names) if class_names else [str(i) for i in range(len(matrix))]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["true \\ predicted", *names])
    for name, row in zip(names, matrix.tolist(), strict=True):
        writer.writerow([name, *row])
    return out.getvalue()
