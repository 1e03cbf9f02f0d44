"""fp32 vs bf16-mixed autocast: the step time of both, the default experiment trained end to end in fp32 (and in
bf16 where bf16 is at most 2x slower, or with ``--full-bf16-run``), and the fp32 model tested under bf16 autocast.
Goal: bf16-mixed becomes the default where it is faster and keeps accuracy (within 1 point)."""

from __future__ import annotations

import statistics

import torch

from callbacks.unfreezing import NoFreeze
from scripts.benchmarks.harness import (
    CUDA,
    SCALE,
    BenchConfig,
    Context,
    StepCost,
    default_model,
    digits,
    quiet_trainer,
)


def bf16_native() -> bool:
    """Whether this device has fast bf16 kernels (oneDNN's bf16 support on a CPU: AVX-512 BF16 or AMX)."""
    if CUDA:
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: absent from some torch builds
        return False


def step_time(config: BenchConfig, precision: str, steps: int = 3) -> float:
    """Median seconds of a full training step of the default model in ``precision`` (one warm-up step)."""
    torch.manual_seed(0)
    cost = StepCost(warmup=1)
    trainer = quiet_trainer(precision=precision, limit_train_batches=steps + 1, callbacks=[NoFreeze(), cost])
    trainer.fit(default_model(config), digits(config))
    return statistics.median(cost.times)


def run(context: Context) -> dict:
    """Step times, the fp32 run (shared with ``pretrained_vs_scratch`` through the context) and the bf16 verdict."""
    config = context.config
    fp32_step, bf16_step = step_time(config, "32-true"), step_time(config, "bf16-mixed")
    speed = fp32_step / bf16_step
    fp32_run = context.default_run("32-true")
    fp32 = fp32_run.result
    bf16_eval = quiet_trainer(precision="bf16-mixed").test(fp32_run.model, fp32_run.data, verbose=False)[0]
    rows = [
        ["fp32 (32-true)", fp32_step, fp32["train_samples_per_s"], fp32["fit_s"], fp32["test_acc"]],
        ["fp32-trained, tested under bf16 autocast", "", "", "", bf16_eval["test/acc"]],
    ]
    ratio = {"bf16 / fp32 speed (step time)": speed}
    native = bf16_native()
    if speed >= 0.5 or config.full_bf16_run:
        bf16 = context.default_run("bf16-mixed").result
        rows.append(["bf16-mixed", bf16_step, bf16["train_samples_per_s"], bf16["fit_s"], bf16["test_acc"]])
        ratio["bf16 - fp32 test acc"] = bf16["test_acc"] - fp32["test_acc"]
        keeps = ratio["bf16 - fp32 test acc"] >= -0.01
        note = (
            "bf16-mixed is faster here and keeps accuracy"
            if speed > 1.05 and keeps
            else "bf16-mixed is not worth it here ("
            + ("not faster" if speed <= 1.05 else "it loses accuracy")
            + "): fp32 stays the default on this device"
        )
    else:
        rows.append(["bf16-mixed", bf16_step, "", "", "not trained: see the note"])
        minutes = fp32["fit_s"] / speed / 60
        note = (
            f"bf16-mixed trains {1 / speed:.1f}x slower here"
            + ("" if native else " (this device has no native bf16 kernels: oneDNN reports no bf16 support)")
            + f", so a full bf16 run (about {minutes:.0f} min) was left out (`--full-bf16-run` forces it); fp32 "
            "stays the default on this device"
        )
    return {
        "title": f"fp32 vs bf16-mixed autocast on {'the GPU' if CUDA else 'the CPU'}: the default experiment",
        "setup": f"step time: median of 3 training steps of the default model (batch {64 * SCALE}); then "
        "configs/digits.yaml end to end (6 epochs, its seed; samples/s exclude validation); native bf16 kernels: "
        + ("yes" if native else "no"),
        "columns": ["precision", "step s", "train samples/s", "fit s", "test acc"],
        "rows": rows,
        "ratio": ratio,
        "goal": "bf16-mixed becomes the default where it is faster and keeps accuracy (within 1 point)",
        "goal_met": None,
        "note": note,
    }
