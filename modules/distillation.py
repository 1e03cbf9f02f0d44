"""Knowledge distillation: a frozen teacher's soft predictions train a smaller student (Hinton et al., 2015,
"Distilling the Knowledge in a Neural Network").

The loss of a training batch, for a student with logits ``s``, a teacher with logits ``t`` and labels ``y``::

    loss = (1 - distill_weight) * task_loss(s, y)
         + distill_weight * T² * KL(softmax(t / T) || softmax(s / T))     # mean over the batch
         + feature_weight * similarity_loss(student features, teacher features)

The temperature ``T`` softens both distributions so that the teacher's ranking of the wrong classes carries signal;
``T²`` keeps the gradients of the soft term at the scale of the hard one whatever ``T`` is. The optional feature term
is similarity-preserving distillation (Tung & Mori, 2019): the student learns to make the same pairs of samples in a
batch alike as the teacher does. It compares ``(B, B)`` matrices, so the two models' feature widths may differ and no
projection (no extra trained parameters, nothing more to export) is needed.

The teacher is any classification checkpoint of this template (its run's ``config.yaml`` names its class). It is
held outside the student's modules: it is not in the state dict, the optimizer or DDP's gradient sync, stays in eval
mode, and runs without gradients. Each model normalises its own inputs (image models take [0, 1] pixels and apply
their backbone's statistics in ``forward``); images are resized to the teacher's size where it differs, and text
needs the same tokenizer for both models.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lightning import LightningModule

from modules.saved_run import load_model


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² * KL(softmax(t / T) || softmax(s / T))``, summed over classes and averaged over the batch.

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``; no gradient flows into them.
        temperature: ``T`` > 0.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


def similarity_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving feature matching (Tung & Mori, 2019): ``||G_s - G_t||²_F / B²``, where ``G = F Fᵀ`` with
    each row scaled to unit L2 norm; ``F`` is a model's ``(B, D)`` features (widths may differ)."""

    def gram(features: torch.Tensor) -> torch.Tensor:
        flat = features.float().flatten(1)
        return F.normalize(flat @ flat.T, dim=1)  # (B, B)

    return (gram(student_features) - gram(teacher_features.detach())).pow(2).mean()


def distillation_loss(
    task_loss: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    distill_weight: float,
    feature_weight: float = 0.0,
    student_features: torch.Tensor | None = None,
    teacher_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss (see the module docstring) and its parts ``{"task", "kd"[, "feature"]}``, for logging."""
    parts = {"task": task_loss, "kd": kd_loss(student_logits, teacher_logits, temperature)}
    loss = (1 - distill_weight) * parts["task"] + distill_weight * parts["kd"]
    if feature_weight > 0:
        parts["feature"] = similarity_loss(student_features, teacher_features)
        loss = loss + feature_weight * parts["feature"]
    return loss, parts


def load_teacher(ckpt: str | Path) -> LightningModule:
    """A classification checkpoint of this template as a frozen teacher: on CPU, in eval mode, no gradients.

    Args:
        ckpt: a checkpoint written by ``scripts/train.py``; the run's ``config.yaml`` beside it (or in one of the two
            folders above) names the model's class.
    """
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} does not exist")
    try:
        teacher, _, _ = load_model(path)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"teacher checkpoint {path} cannot be used ({reason})") from err
    if not hasattr(teacher, "head") or not hasattr(teacher, "features") or "num_classes" not in teacher.hparams:
        raise ValueError(f"teacher checkpoint {path} holds a {type(teacher).__name__}, not a classifier")
    teacher.requires_grad_(False)
    return teacher.eval()


def check_teacher(student: LightningModule, teacher: LightningModule, source: str) -> None:
    """Raise a one-line error when ``teacher`` cannot teach ``student``: other classes, another modality, another
    tokenizer, or multi-label (the soft targets are a softmax)."""
    s_hp, t_hp = student.hparams, teacher.hparams
    s_names, t_names = s_hp.get("class_names"), t_hp.get("class_names")
    if s_names is not None and t_names is not None and list(s_names) != list(t_names):
        raise ValueError(f"teacher {source} has classes {list(t_names)} but the student {list(s_names)}")
    if s_hp.num_classes != t_hp.num_classes:
        raise ValueError(f"teacher {source} has {t_hp.num_classes} classes but the student {s_hp.num_classes}")
    if s_hp.get("multi_label") or t_hp.get("multi_label"):
        raise ValueError("distillation (model.teacher) needs single-label classifiers; this one is multi-label")
    s_tok, t_tok = getattr(student, "tokenizer_path", None), getattr(teacher, "tokenizer_path", None)
    if (s_tok is None) != (t_tok is None):
        kinds = {True: "a text model", False: "an image model"}
        raise ValueError(f"teacher {source} is {kinds[t_tok is not None]} but the student {kinds[s_tok is not None]}")
    if s_tok is not None and _same_path(s_tok) != _same_path(t_tok):
        raise ValueError(
            f"teacher {source} uses the tokenizer {t_tok} but the student {s_tok}: both read the same token ids, "
            "so they need the same tokenizer"
        )


def _same_path(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def teacher_inputs(inputs, teacher: LightningModule):
    """The student's batch as the teacher takes it: images resized to the teacher's side where it differs (each
    image model normalises its [0, 1] input itself); token ids unchanged (same tokenizer)."""
    if not (isinstance(inputs, torch.Tensor) and inputs.ndim == 4):
        return inputs
    side = teacher.hparams.get("predict_image_size") or getattr(teacher, "input_size", None)
    if not side or tuple(inputs.shape[-2:]) == (side, side):
        return inputs
    return F.interpolate(inputs, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
