"""`make bench`: the measuring pieces (FLOP counts, the report), and every section run alone and in either order on a
tiny model and split, so a section cannot depend on what another one left behind."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scripts import bench
from scripts.benchmarks import efficiency, overhead, pretrained_vs_scratch, text
from scripts.benchmarks.cli import main, run_sections
from scripts.benchmarks.harness import BenchConfig, Context, DefaultRun, digits, training_flops
from tests.conftest import SHARED_DATA

TINY_SPLIT = {"val_fraction": 0.05, "test_fraction": 0.85}  # about 180 training images: 3 batches
TINY = BenchConfig(
    samples=32,
    reps=1,
    backbone="efficientnet_tiny",
    image_size=16,
    digits=TINY_SPLIT,
    text_encoder="bert-tiny",
    compile_backend="aot_eager",
    experiment_args=(
        *("--model.backbone", "efficientnet_tiny", "--data.image_size", "16", "--trainer.max_epochs", "1"),
        *(arg for key, value in TINY_SPLIT.items() for arg in (f"--data.{key}", str(value))),
    ),
)
SLOW = {
    "precision",
    "pretrained_vs_scratch",
    "text",
    "efficiency",
    "lora",
    "quantization",
    "compile",
}  # end-to-end runs, MiniLM, the matmul peak, inductor compilations


def structure(result: dict) -> dict:
    """What a section reports, without its measured values: keys, columns, and each row's label and width."""
    return {"keys": list(result), "columns": result["columns"], "rows": [(row[0], len(row)) for row in result["rows"]]}


@pytest.fixture
def tiny_sst2(tmp_path: Path) -> Path:
    """32 training sentences and 32 dev sentences of SST-2, in the layout the text section reads."""
    source = SHARED_DATA / "sst2"
    if not source.is_dir():
        pytest.skip("../shared/data/sst2 is absent")
    folder = tmp_path / "sst2"
    folder.mkdir()
    for name in ("train.tsv", "glue_dev.tsv"):
        lines = (source / name).read_text(encoding="utf-8").splitlines()[:33]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_training_flops_counts_forward_and_weight_gradients_exactly() -> None:
    batch, n_in, n_out = 4, 8, 3
    model = torch.nn.Linear(n_in, n_out)
    inputs, labels = torch.randn(batch, n_in), torch.tensor([0, 1, 2, 0])
    flops = training_flops(model, (inputs, labels), lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    # forward: 2*B*in*out; backward: the weight gradient only (the inputs need no gradient).
    assert flops == 2 * (2 * batch * n_in * n_out)
    assert all(p.grad is None for p in model.parameters())


def test_training_flops_of_a_depthwise_convolution_respect_groups() -> None:
    # torch's own backward formula ignores groups (32x too many here); ours counts one forward per gradient.
    channels, size, batch = 32, 16, 8
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
    forward = 2 * batch * channels * 9 * size * size
    inputs = torch.rand(batch, channels, size, size)
    assert training_flops(conv, inputs, lambda m, x: m(x).sum()) == 2 * forward
    inputs.requires_grad_()
    assert training_flops(conv, inputs, lambda m, x: m(x).sum()) == 3 * forward


def test_overhead_runs_both_sides_over_the_same_samples() -> None:
    result = overhead.run(Context(TINY))
    train_samples = len(digits(TINY).train_set)
    assert result["samples_per_epoch"] == {"template": train_samples, "plain": train_samples}
    template, plain = (row[1] for row in result["rows"])
    assert result["ratio"]["template / plain loop"] == pytest.approx(template / plain)
    assert result["goal_met"] == (template / plain >= 0.97)


def test_text_section_skips_with_a_note_when_the_data_is_absent(tmp_path) -> None:
    result = text.run(Context(replace(TINY, sst2=tmp_path / "sst2")))
    assert result == {"skipped": f"{tmp_path / 'sst2'} is absent: the text comparison needs ../shared/data/sst2"}


@pytest.mark.parametrize(  # overhead: test_overhead_runs_both_sides_over_the_same_samples runs it alone
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in bench.SECTIONS if n != "overhead"]
)
def test_each_section_runs_alone(name: str, request) -> None:
    config = replace(TINY, sst2=request.getfixturevalue("tiny_sst2")) if name == "text" else TINY
    context = Context(config)
    assert run_sections({name: bench.SECTIONS[name]}, context) == []
    result = context.earlier[name]
    assert result["rows"] and all(len(row) == len(result["columns"]) for row in result["rows"])


def test_sections_report_the_same_in_either_order() -> None:
    names = ("frozen_vs_full", "overhead")
    results = []
    for order in (names, names[::-1]):
        context = Context(TINY)
        assert run_sections({name: bench.SECTIONS[name] for name in order}, context) == []
        results.append({name: structure(context.earlier[name]) for name in names})
    assert results[0] == results[1]


@pytest.mark.slow
def test_efficiency_takes_the_throughput_overhead_measured_from_its_context() -> None:
    measured = {"template": 123.0, "plain": 456.0}
    context = Context(TINY)
    context.record("overhead", {"samples_per_s": measured})
    result = efficiency.run(context)  # alone, it measures them itself (test_each_section_runs_alone)
    assert [row[:3:2] for row in result["rows"]] == [["image: template", 123.0], ["image: plain loop", 456.0]]


def test_default_runs_are_shared_within_a_context_only(monkeypatch) -> None:
    trained = []

    def fake_train(config: BenchConfig, precision: str, pretrained: bool) -> DefaultRun:
        trained.append((precision, pretrained))
        return DefaultRun({"test_acc": 0.9 if pretrained else 0.5, "fit_s": 1.0}, model=None, data=None)

    monkeypatch.setattr("scripts.benchmarks.harness.train_default", fake_train)
    context = Context(TINY)
    first = pretrained_vs_scratch.run(context)
    assert pretrained_vs_scratch.run(context) == first
    assert trained == [("32-true", True), ("32-true", False)]
    pretrained_vs_scratch.run(Context(TINY))
    assert len(trained) == 4
    assert first["ratio"]["pre-trained - scratch test acc"] == pytest.approx(0.4)


def test_a_section_leaves_no_environment_behind(monkeypatch) -> None:
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)

    def seeds(context: Context) -> dict:  # what the CLI's seed_everything does
        os.environ["PL_GLOBAL_SEED"] = "42"
        return {}

    def reads(context: Context) -> dict:
        return {"seed": os.environ.get("PL_GLOBAL_SEED")}

    context = Context(TINY)
    assert run_sections({"seeds": seeds, "reads": reads}, context) == []
    assert context.earlier["reads"] == {"seed": None}


def test_report_keeps_going_past_a_failed_section_and_says_which(tmp_path) -> None:
    def fine(context: Context) -> dict:
        return {
            "title": "Fine section",
            "setup": "a setup",
            "columns": ["side", "samples/s"],
            "rows": [["ours", 12.5], ["theirs", 25.0]],
            "ratio": {"ours / theirs": 0.5},
            "goal": "ours >= 0.97 x theirs",
            "goal_met": False,
        }

    def broken(context: Context) -> dict:
        raise RuntimeError("out of memory")

    with pytest.raises(SystemExit, match="bench sections failed: broken"):
        main({"broken": broken, "fine": fine}, ["--out", str(tmp_path)])
    report = json.loads((tmp_path / "results.json").read_text())
    assert list(report["sections"]) == ["broken", "fine"]
    assert report["sections"]["broken"] == {"error": "RuntimeError: out of memory"}
    assert report["machine"]["torch"] == torch.__version__
    md = (tmp_path / "results.md").read_text()
    assert "**Failed**: RuntimeError: out of memory" in md
    assert "| ours | 12.5 |" in md
    assert "- ours / theirs: **0.5**" in md
    assert "- goal: ours >= 0.97 x theirs: **MISSED**" in md


def test_only_runs_the_chosen_sections_in_their_order(tmp_path) -> None:
    def section(context: Context) -> dict:
        return {"skipped": f"after {', '.join(context.earlier) or 'nothing'}"}

    report = main({"a": section, "b": section, "c": section}, ["--only", "c", "a", "--out", str(tmp_path)])
    assert report["sections"] == {"a": {"skipped": "after nothing"}, "c": {"skipped": "after a"}}
