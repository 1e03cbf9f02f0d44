"""Post-training int8 quantization (``modules/quantize.py``, ``scripts/export.py --quantize int8``): the int8 model
stays close to the float one, really runs int8 kernels, loads back without Lightning, and the export records and
enforces its accuracy.

Tolerance: the largest logit difference between the int8 and the float model is at most 5% of the float logits'
range over the batch. One int8 step is 1/255 of a tensor's range (0.4%); rounding in the ten or so quantized layers of
the tiny models adds up to 1-2% here (resnet_tiny 1.5%, bert-tiny 0.8% measured). A wrong scale or zero point gives
errors of the order of the range itself, far above 5%.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules.digits import DigitsDataModule
from modules.image_classifier import ImageClassifier
from modules.quantize import INT8_FILE, load_int8, quantize_int8, save_int8
from modules.text_classifier import TextClassifier

RELATIVE_TOLERANCE = 0.05


def _within_tolerance(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """The largest difference as a share of the float logits' range."""
    return ((expected - actual).abs().max() / (expected.max() - expected.min())).item()


def _ops(module: torch.nn.Module) -> set[str]:
    return {str(node.target) for node in module.graph.nodes if node.op == "call_function"}


@pytest.mark.slow
def test_int8_image_model_stays_within_tolerance_and_runs_onednn_int8(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ImageClassifier("resnet_tiny", num_classes=3, pretrained=False, predict_image_size=32).eval()
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.rand(8, 3, 32, 32, generator=generator) for _ in range(2)]
    path = save_int8(quantize_int8(model, calibration), tmp_path / INT8_FILE)
    fp32_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert path.stat().st_size < 0.35 * fp32_bytes  # int8 weights: a quarter of the float ones, plus the graph
    int8 = load_int8(path)
    assert any("qconv" in op for op in _ops(int8.program))  # lowered to oneDNN's int8 convolutions
    images = torch.rand(5, 3, 32, 32, generator=generator)  # another batch size than the calibration's
    with torch.no_grad():
        expected, actual = model(images), int8(images)
        reference = load_int8(path, lower=False)(images)  # the saved q/dq form, unlowered
    assert actual.shape == expected.shape
    assert 0 < _within_tolerance(expected, actual) < RELATIVE_TOLERANCE
    assert _within_tolerance(reference, actual) < 0.01


@pytest.mark.slow
def test_int8_text_model_stays_within_tolerance_and_runs_int8_matmuls(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = TextClassifier("bert-tiny", num_classes=2, pretrained=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(model.tokenizer_path)
    traced = dict(tokenizer(["a fine film", "not good at all, really"], padding=True, return_tensors="pt"))
    path = save_int8(quantize_int8(model, [traced]), tmp_path / INT8_FILE)
    int8 = load_int8(path)
    assert "aten._int_mm.default" in _ops(int8.program)
    texts = ["something else entirely", "x", "three sentences of quite different lengths here"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))  # another batch size and length
    del batch["token_type_ids"]  # optional, as for the float model: zeros
    with torch.no_grad():
        expected, actual = model(batch), int8(batch)
    assert actual.shape == expected.shape
    assert 0 < _within_tolerance(expected, actual) < RELATIVE_TOLERANCE


@pytest.fixture
def image_run(tmp_path: Path, monkeypatch) -> dict:
    """A resnet_tiny digits model and data module that ``scripts.export`` sees as a run's (no training)."""
    import scripts.export

    torch.manual_seed(0)
    model = ImageClassifier(
        "resnet_tiny", num_classes=10, pretrained=False, predict_image_size=32, class_names=[str(d) for d in range(10)]
    ).eval()
    data = DigitsDataModule(image_size=32, batch_size=32, val_fraction=0.05, test_fraction=0.05)
    settings = {"model": {"class_path": "modules.image_classifier.ImageClassifier"}, "data": {"class_path": "x"}}
    monkeypatch.setattr(scripts.export, "load_run", lambda ckpt, config: (model, settings, tmp_path))
    monkeypatch.setattr(scripts.export, "build_datamodule", lambda settings, **overrides: data)
    return {"model": model, "out": tmp_path / "export"}


@pytest.mark.slow
def test_export_writes_the_int8_program_and_its_accuracy(image_run: dict) -> None:
    from scripts.export import main

    out = image_run["out"]
    args = ["x.ckpt", "--out", str(out), "--formats", "safetensors", "--quantize", "int8"]
    main([*args, "--calibration-batches", "2", "--eval-batches", "2", "--max-drop", "1"])
    meta = json.loads((out / "config.json").read_text())
    assert meta["files"]["int8"] == INT8_FILE and (out / INT8_FILE).is_file()
    record = meta["int8"]
    assert record["bytes"] == (out / INT8_FILE).stat().st_size and record["bytes"] < record["fp32_weight_bytes"] / 2
    assert record["eval"] == {"split": "test", "batches": 2, "samples": 64} and record["calibration_batches"] == 2
    accuracy = record["accuracy"]
    assert 0 <= accuracy["int8"] <= 1 and accuracy["drop"] == pytest.approx(accuracy["fp32"] - accuracy["int8"])
    int8 = load_int8(out / INT8_FILE)  # no Lightning, no ImageClassifier: the program and torchao
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert _within_tolerance(image_run["model"](images), int8(images)) < RELATIVE_TOLERANCE


@pytest.mark.slow
def test_export_refuses_an_int8_model_that_drops_too_much(image_run: dict) -> None:
    from scripts.export import export

    out, refused = image_run["out"], r"int8 accuracy .* below fp32 .* \(> --max-drop -1\); model_int8.pt2 not kept"
    with pytest.raises(RuntimeError, match=refused):
        export(
            "x.ckpt", str(out), ("safetensors",), quantize="int8", calibration_batches=1, eval_batches=1, max_drop=-1
        )
    assert not (out / INT8_FILE).exists() and not (out / "config.json").exists()


def test_qa_and_masked_lm_are_refused_in_one_line(tmp_path: Path, monkeypatch) -> None:
    import scripts.export
    from modules.mlm import MaskedLM
    from modules.qa import ExtractiveQA

    for model in (ExtractiveQA("bert-tiny", pretrained=False), MaskedLM("bert-tiny", pretrained=False)):
        settings = {"model": {"class_path": f"modules.x.{type(model).__name__}"}, "data": {"class_path": "x"}}
        run = (model.eval(), settings, tmp_path)
        monkeypatch.setattr(scripts.export, "load_run", lambda ckpt, config, run=run: run)
        with pytest.raises(ValueError, match=f"{type(model).__name__} is not one") as error:
            scripts.export.export("x.ckpt", str(tmp_path / "out"), ("safetensors",), quantize="int8")
        assert "\n" not in str(error.value)
        assert not (tmp_path / "out").exists()  # refused before anything is written
