"""The task protocol (modules/finetune.py): shared arguments declared once and still in each task's --help, the
hooks the scripts call instead of asking which task a model is, and the bugs found on the way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from callbacks.tracking import group_table
from modules.finetune import FineTuneModule
from modules.image_classifier import ImageClassifier
from modules.mlm import MaskedLM


@pytest.mark.parametrize(
    "task", ["image_classifier.ImageClassifier", "text_classifier.TextClassifier", "qa.ExtractiveQA"]
)
def test_shared_arguments_are_in_each_tasks_help(task: str, capsys) -> None:
    from scripts.train import main

    with pytest.raises(SystemExit):
        main(["fit", "--model.help", f"modules.{task}"])
    shown = capsys.readouterr().out
    for argument, doc in (("layer_decay", "layer-wise LR decay"), ("weight_decay", "weight decay of weight matrices")):
        assert f"--model.{argument}" in shown and doc in " ".join(shown.split())


def test_task_defaults_and_shared_arguments_reach_the_hyperparameters() -> None:
    from modules.text_classifier import TextClassifier

    text = TextClassifier("bert-tiny", num_classes=2, layer_decay=0.5)
    assert (text.hparams.lr, text.hparams.backbone_lr, text.hparams.layer_decay) == (1e-4, 1e-5, 0.5)
    assert text.hparams.weight_decay == 0.01 and text.hparams.dropout == 0.1  # the base's and the task's defaults
    image = ImageClassifier("resnet_tiny", num_classes=2, pretrained=False)
    assert (image.hparams.lr, image.hparams.backbone_lr, image.hparams.dropout) == (1e-3, None, 0.2)


class Doubler(FineTuneModule):
    """A task written the way the README says: its own arguments, ``**kwargs`` to the base, and the hooks."""

    def __init__(self, width: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.backbone = nn.Linear(width, width)
        self.layer_groups = {"all": ("",)}
        self.head = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def predict_path(self, source: Path, datamodule) -> list[dict]:
        return [{"input": v, "doubled": 2 * v} for v in json.loads(source.read_text())]

    def example_input(self) -> torch.Tensor:
        return torch.rand(2, self.hparams.width)


def test_predict_and_export_call_the_tasks_hooks(tmp_path: Path, monkeypatch) -> None:
    import scripts.export
    import scripts.predict

    model = Doubler(width=4, lr=0.5)
    lrs = {g["name"]: g["lr"] for g in model.configure_optimizers().param_groups}
    assert model.hparams.lr == 0.5 and lrs["backbone.all"] == pytest.approx(0.05)  # the base's ratio 0.1
    settings = {"model": {"class_path": "tests.test_task_protocol.Doubler"}, "data": {"class_path": "x"}}
    monkeypatch.setattr(scripts.predict, "load_run", lambda ckpt, config: (model, settings, tmp_path))
    monkeypatch.setattr(scripts.predict, "build_datamodule", lambda settings: None)
    (tmp_path / "numbers.json").write_text("[1, 2]")
    assert scripts.predict.predict("x.ckpt", str(tmp_path / "numbers.json")) == [
        {"input": 1, "doubled": 2},
        {"input": 2, "doubled": 4},
    ]
    monkeypatch.setattr(scripts.export, "load_run", lambda ckpt, config: (model.eval(), settings, tmp_path))
    written = scripts.export.export("x.ckpt", str(tmp_path / "out"), ("safetensors", "torchscript"))
    assert set(written) == {"safetensors", "torchscript", "config"}  # a graph, since the task has a tensor input


def test_a_task_without_the_hooks_says_so() -> None:
    model = Doubler()
    del Doubler.predict_path  # back to the base's
    try:
        with pytest.raises(ValueError, match="Doubler does not predict on files"):
            model.predict_path(Path("x"), None)
    finally:
        Doubler.predict_path = _doubler_predict_path


_doubler_predict_path = Doubler.predict_path


def test_the_image_size_is_never_guessed() -> None:
    """The first wave fed 224 px to predict and export when the data module's argument was not named image_size."""
    model = ImageClassifier("resnet_tiny", num_classes=2, pretrained=False)
    with pytest.raises(ValueError, match="does not know its image size: model.predict_image_size is unset"):
        model.example_input()
    assert ImageClassifier("resnet_tiny", num_classes=2, pretrained=False, predict_image_size=40).image_side == 40
    assert ImageClassifier("vit_tiny", num_classes=2, pretrained=False).image_side == 32  # the backbone's own size
    meta = ImageClassifier("resnet_tiny", num_classes=2, pretrained=False, predict_image_size=40).export_meta()
    assert meta["input"]["shape"] == ["batch", 3, 40, 40]


def test_the_group_table_counts_a_tied_head_weight_once() -> None:
    """The MLM head's output matrix is the word embeddings: one tensor, counted in the embeddings group only."""
    model = MaskedLM("bert-tiny")
    rows = group_table(model)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(r["params"] for r in rows) == sum(unique.values())
    embeddings = model.backbone.embeddings.word_embeddings.weight
    assert any(p is embeddings for p in model.head.parameters())  # tied, as in transformers
    assert next(r for r in rows if r["group"] == "backbone.embeddings")["params"] >= embeddings.numel()


def test_a_model_that_fails_to_build_shows_its_own_message(capsys, monkeypatch) -> None:
    """jsonargparse wraps what a model's constructor raised in a list of failed Union subtypes."""
    from scripts.train import run_cli

    def build() -> None:
        raise ValueError(
            "Does not validate against any of the Union subtypes\nSubtypes: [LightningModule, NoneType]\nErrors:\n"
            "  - unknown backbone 'resnet19'; known backbones: resnet18\n  - Expected a <class 'NoneType'>\n"
            "Given value type: <class 'jsonargparse._namespace.Namespace'>"
        )

    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises(SystemExit):
        run_cli(build)
    assert capsys.readouterr().err.startswith("error: unknown backbone 'resnet19'; known backbones: resnet18  (--debug")
