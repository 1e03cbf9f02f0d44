"""`make bench`: the measuring pieces (FLOP counts, timers, the report) and one real section on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from scripts import bench


def test_training_flops_counts_forward_and_weight_gradients_exactly() -> None:
    batch, n_in, n_out = 4, 8, 3
    model = torch.nn.Linear(n_in, n_out)
    inputs, labels = torch.randn(batch, n_in), torch.tensor([0, 1, 2, 0])
    flops = bench.training_flops(model, (inputs, labels), lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    # forward: 2*B*in*out; backward: the weight gradient only (the inputs need no gradient).
    assert flops == 2 * (2 * batch * n_in * n_out)
    assert all(p.grad is None for p in model.parameters())


def test_training_flops_of_a_depthwise_convolution_respect_groups() -> None:
    # torch's own backward formula ignores groups (32x too many here); ours counts one forward per gradient.
    channels, size, batch = 32, 16, 8
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
    forward = 2 * batch * channels * 9 * size * size
    inputs = torch.rand(batch, channels, size, size)
    assert bench.training_flops(conv, inputs, lambda m, x: m(x).sum()) == 2 * forward
    inputs.requires_grad_()
    assert bench.training_flops(conv, inputs, lambda m, x: m(x).sum()) == 3 * forward


def test_overhead_runs_both_sides_over_the_same_samples() -> None:
    result = bench.overhead(reps=1, backbone="efficientnet_tiny", image_size=16)
    data = bench._digits(image_size=16)
    assert result["samples_per_epoch"] == {"template": len(data.train_set), "plain": len(data.train_set)}
    template, plain = (row[1] for row in result["rows"])
    assert result["ratio"]["template / plain loop"] == pytest.approx(template / plain)
    assert result["goal_met"] == (template / plain >= 0.97)


def test_text_section_skips_with_a_note_when_the_data_is_absent(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "SST2", tmp_path / "sst2")
    assert bench.text() == {"skipped": f"{tmp_path / 'sst2'} is absent: the text comparison needs ../shared/data/sst2"}


def test_report_keeps_going_past_a_failed_section_and_says_which(tmp_path, monkeypatch) -> None:
    def fine(**_):
        return {
            "title": "Fine section",
            "setup": "a setup",
            "columns": ["side", "samples/s"],
            "rows": [["ours", 12.5], ["theirs", 25.0]],
            "ratio": {"ours / theirs": 0.5},
            "goal": "ours >= 0.97 x theirs",
            "goal_met": False,
        }

    def broken(**_):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bench, "SECTIONS", {"broken": broken, "fine": fine})
    with pytest.raises(SystemExit, match="bench sections failed: broken"):
        bench.main(["--out", str(tmp_path)])
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["sections"]["broken"] == {"error": "RuntimeError: out of memory"}
    assert report["machine"]["torch"] == torch.__version__
    md = (tmp_path / "results.md").read_text()
    assert "**Failed**: RuntimeError: out of memory" in md
    assert "| ours | 12.5 |" in md
    assert "- ours / theirs: **0.5**" in md
    assert "- goal: ours >= 0.97 x theirs: **MISSED**" in md
