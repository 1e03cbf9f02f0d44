"""Knowledge distillation: the loss against hand-computed values, a frozen teacher kept out of the student's state
dict and optimizer whose weights never change in fit, the student standing alone after training, the one-line errors
(missing or corrupt teacher, other classes, other modality, other tokenizer), and ``encoder_layers``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning import Trainer

from datamodules.image_folder import ImageFolderDataModule
from modules.distillation import check_teacher, distillation_loss, kd_loss, similarity_loss, teacher_inputs
from modules.image_classifier import ImageClassifier
from modules.text_classifier import TextClassifier

CLASSES = ["blue", "green", "red"]  # conftest's split_image_folder


def _trainer(tmp_path: Path, **kwargs) -> Trainer:
    options = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_steps=3,
    )
    return Trainer(**(options | kwargs))


def _images(root: Path, size: int) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(root), image_size=size, batch_size=4, num_workers=0)


def _save_run(model, folder: Path, trainer: Trainer) -> Path:
    """A run folder as scripts/train.py writes it: config.yaml naming the model's class, checkpoints/last.ckpt."""
    (folder / "checkpoints").mkdir(parents=True)
    cls = type(model)
    (folder / "config.yaml").write_text(f"model:\n  class_path: {cls.__module__}.{cls.__name__}\n")
    trainer.save_checkpoint(folder / "checkpoints" / "last.ckpt")
    return folder / "checkpoints" / "last.ckpt"


@pytest.fixture
def image_teacher(tmp_path: Path, split_image_folder: Path) -> Path:
    """A resnet_tiny teacher trained for 2 steps on 32 px images, saved as a run."""
    torch.manual_seed(0)
    model = ImageClassifier("resnet_tiny", pretrained=False, class_names=CLASSES, predict_image_size=32)
    trainer = _trainer(tmp_path / "fit_teacher", max_steps=2)
    trainer.fit(model, _images(split_image_folder, 32))
    return _save_run(model, tmp_path / "teacher_run", trainer)


def test_kd_loss_equals_the_hand_computed_value() -> None:
    # T = 2: the teacher's logits (2 ln 3, 0) soften to (3/4, 1/4), the student's (0, 0) to (1/2, 1/2).
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2); times T² = 4: 3 ln(3/2) - ln 2 = ln(27/16).
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[2 * math.log(3), 0.0]])
    assert kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(math.log(27 / 16), rel=1e-6)
    # A second sample on which the models agree adds 0: the mean over the batch halves it.
    pair = kd_loss(torch.cat([student, teacher]), torch.cat([teacher, teacher]), temperature=2.0)
    assert pair.item() == pytest.approx(math.log(27 / 16) / 2, rel=1e-6)
    loss, parts = distillation_loss(torch.tensor(1.0), student, teacher, temperature=2.0, distill_weight=0.25)
    assert loss.item() == pytest.approx(0.75 * 1.0 + 0.25 * math.log(27 / 16), rel=1e-6)
    assert set(parts) == {"task", "kd"}


def test_similarity_loss_equals_the_hand_computed_value() -> None:
    # Student: orthogonal samples, G = I. Teacher (width 1): identical samples, G = all ones, rows normalised to
    # 1/sqrt(2). Squared differences: 2 x (1 - 1/sqrt(2))² on the diagonal, 2 x 1/2 off it; mean over 4 entries.
    student, teacher = torch.eye(2), torch.ones(2, 1)
    expected = (2 * (1 - 2**-0.5) ** 2 + 2 * 0.5) / 4
    assert similarity_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert similarity_loss(3 * student, student).item() == pytest.approx(0.0, abs=1e-7)  # scale does not matter
    loss, parts = distillation_loss(
        torch.tensor(1.0), torch.zeros(2, 2), torch.zeros(2, 2), 1.0, 0.5, 2.0, student, teacher
    )
    assert loss.item() == pytest.approx(0.5 + 2.0 * expected, rel=1e-6)
    assert parts["kd"].item() == pytest.approx(0.0, abs=1e-7)


def test_the_teacher_never_changes_and_stays_out_of_the_students_state_and_optimizer(
    tmp_path: Path, split_image_folder: Path, image_teacher: Path
) -> None:
    saved = torch.load(image_teacher, map_location="cpu", weights_only=True)["state_dict"]
    torch.manual_seed(1)
    student = ImageClassifier(
        "resnet_tiny", pretrained=False, class_names=CLASSES, teacher=str(image_teacher), feature_weight=0.5
    )
    plain_keys = set(ImageClassifier("resnet_tiny", pretrained=False, class_names=CLASSES).state_dict())
    trainer = _trainer(tmp_path / "fit_student")
    trainer.fit(student, _images(split_image_folder, 24))  # 24 px for the student, resized to 32 for the teacher

    teacher = student.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert set(teacher.state_dict()) == set(saved)
    for name, tensor in teacher.state_dict().items():  # weights and BatchNorm statistics, bit for bit
        assert torch.equal(tensor, saved[name]), name
    assert set(student.state_dict()) == plain_keys
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized and not optimized & {id(p) for p in teacher.parameters()}
    assert {"train/task_loss", "train/kd_loss", "train/feature_loss"} <= set(trainer.callback_metrics)

    # The student stands alone: its checkpoint does not name the teacher, and loads with the teacher gone.
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    image_teacher.unlink()
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "student.ckpt", weights_only=True)
    assert restored.hparams.teacher is None and restored.teacher is None
    restored.eval(), student.eval()
    images = torch.rand(2, 3, 24, 24)
    assert torch.equal(restored(images), student(images))


def test_images_are_resized_to_the_teachers_side() -> None:
    teacher = ImageClassifier("resnet_tiny", pretrained=False, num_classes=2, predict_image_size=32)
    assert teacher_inputs(torch.rand(2, 3, 24, 24), teacher).shape == (2, 3, 32, 32)
    same = torch.rand(2, 3, 32, 32)
    assert teacher_inputs(same, teacher) is same


def test_a_text_teacher_is_frozen_in_fit(tmp_path: Path) -> None:
    from tests.test_text_classification import NEGATIVE, POSITIVE, _data, write_tsv

    rows = [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE]
    write_tsv(tmp_path / "train.tsv", rows)
    write_tsv(tmp_path / "dev.tsv", rows[:2] + rows[-2:])
    torch.manual_seed(0)
    teacher = TextClassifier("bert-tiny", class_names=["neg", "pos"])
    trainer = _trainer(tmp_path / "fit_teacher", max_steps=1)
    trainer.fit(teacher, _data(tmp_path))
    ckpt = _save_run(teacher, tmp_path / "teacher_run", trainer)
    saved = {k: v.clone() for k, v in teacher.state_dict().items()}

    student = TextClassifier("bert-tiny", class_names=["neg", "pos"], teacher=str(ckpt), distill_weight=0.9)
    _trainer(tmp_path / "fit_student").fit(student, _data(tmp_path))
    assert all(torch.equal(v, saved[k]) for k, v in student.teacher.state_dict().items())
    assert not any(name.startswith("teacher") for name in student.state_dict())


def test_teacher_and_student_must_agree(image_teacher: Path) -> None:
    teacher = ImageClassifier.load_from_checkpoint(image_teacher, weights_only=True)
    other_names = ImageClassifier("resnet_tiny", pretrained=False, class_names=["cat", "dog", "emu"])
    with pytest.raises(ValueError, match=r"has classes \['blue', 'green', 'red'\] but the student \['cat'"):
        check_teacher(other_names, teacher, "t.ckpt")
    with pytest.raises(ValueError, match="has 3 classes but the student 2"):
        check_teacher(ImageClassifier("resnet_tiny", pretrained=False, num_classes=2), teacher, "t.ckpt")
    text = TextClassifier("bert-tiny", class_names=CLASSES)
    with pytest.raises(ValueError, match="t.ckpt is an image model but the student a text model"):
        check_teacher(text, teacher, "t.ckpt")
    text_teacher = TextClassifier("bert-tiny", class_names=CLASSES)
    check_teacher(text, text_teacher, "t.ckpt")  # the same tokenizer
    text_teacher.tokenizer_path = "bert-base-cased"
    with pytest.raises(ValueError, match="uses the tokenizer bert-base-cased but the student .*same tokenizer"):
        check_teacher(text, text_teacher, "t.ckpt")


def test_a_missing_or_corrupt_teacher_is_a_one_line_error_naming_it(tmp_path: Path, split_image_folder: Path) -> None:
    def fit_with(teacher: Path) -> None:
        student = ImageClassifier("resnet_tiny", pretrained=False, class_names=CLASSES, teacher=str(teacher))
        _trainer(tmp_path / "fit").fit(student, _images(split_image_folder, 24))

    missing = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=f"teacher checkpoint {missing} does not exist"):
        fit_with(missing)
    corrupt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"teacher checkpoint {corrupt} cannot be used \\(no config.yaml") as err:
        fit_with(corrupt)
    assert "\n" not in str(err.value)
    (tmp_path / "run" / "config.yaml").write_text("model:\n  class_path: modules.image_classifier.ImageClassifier\n")
    with pytest.raises(ValueError, match=f"teacher checkpoint {corrupt} cannot be used \\(checkpoint .* cannot be"):
        fit_with(corrupt)


def test_distillation_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="0 <= model.distill_weight <= 1"):
        ImageClassifier("resnet_tiny", pretrained=False, num_classes=2, distill_weight=1.5)


def test_encoder_layers_keeps_the_first_layers_with_their_pretrained_weights() -> None:
    full = TextClassifier("all-minilm-l6-v2", class_names=["neg", "pos"])
    small = TextClassifier("all-minilm-l6-v2", class_names=["neg", "pos"], encoder_layers=2)
    assert len(small.backbone.encoder.layer) == 2 and small.backbone.config.num_hidden_layers == 2
    assert list(small.layer_groups) == ["embeddings", "layer0", "layer1"]
    kept = small.backbone.state_dict()
    reference = full.backbone.state_dict()
    assert kept and all(torch.equal(tensor, reference[name]) for name, tensor in kept.items())
    assert set(reference) - set(kept) == {
        n for n in reference if n.startswith(tuple(f"encoder.layer.{i}." for i in range(2, 6)))
    }
    with pytest.raises(ValueError, match="has 2 transformer layers; cannot keep 3"):
        TextClassifier("bert-tiny", num_classes=2, encoder_layers=3)
