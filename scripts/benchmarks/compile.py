"""Eager vs ``model.compile`` (``torch.compile`` of the backbone, in place, default inductor backend): the time of a
full training step of the default image experiment (EfficientNet-Lite0 at 64 px, batch 64, as ``configs/digits.yaml``)
and of the text default (all-MiniLM-L6-v2, batch 32 of 64 tokens, as the ``lora`` section), and what compiling costs:
the extra time of the first steps, paid again at each phase change of a freezing strategy. Inductor's on-disk cache
is an empty folder for the section, so the compile time is the cold one a first run pays."""

from __future__ import annotations

import statistics
import sys
import time

import torch
from lightning import Callback
from torch._inductor.utils import fresh_cache

from callbacks.unfreezing import NoFreeze
from modules.text_classifier import TextClassifier
from scripts.benchmarks.harness import CUDA, SCALE, Context, default_model, digits, quiet_trainer, sync
from scripts.benchmarks.lora import _Data as TokenData

WARMUP = 2  # steps whose time holds the compilation (the forward's and the backward's graphs)


class StepTimes(Callback):
    """Wall time of every training step (forward, backward, optimizer step), the first ones included."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync()
        self.times.append(time.perf_counter() - self._start)


def _measure(build, data, compiled: bool, steps: int) -> dict:
    """Step times of one model built by ``build(compiled)`` on ``data``'s first ``WARMUP + steps`` batches."""
    torch.compiler.reset()  # nothing compiled by another side or section is reused
    torch.manual_seed(0)
    timer = StepTimes()
    trainer = quiet_trainer(limit_train_batches=WARMUP + steps, callbacks=[NoFreeze(), timer])
    trainer.fit(build(compiled), data)
    first, timed = timer.times[:WARMUP], timer.times[WARMUP:] or timer.times[-1:]
    return {"step_s": statistics.median(timed), "first_steps_s": sum(first), "timed_steps": len(timed)}


def _compare(name: str, build, data, steps: int) -> dict:
    eager = _measure(build, data, False, steps)
    compiled = _measure(build, data, True, steps)
    compile_s = compiled["first_steps_s"] - eager["first_steps_s"]
    saved = eager["step_s"] - compiled["step_s"]
    result = {
        "eager": eager,
        "compiled": compiled,
        "speedup": eager["step_s"] / compiled["step_s"],
        "compile_s": compile_s,
        # Steps after which the compiled run has caught up with the eager one (None: it never does).
        "break_even_steps": compile_s / saved if saved > 0 else None,
    }
    print(f"[bench] compile/{name}: {result}", file=sys.stderr, flush=True)
    return result


def run(context: Context, steps: int = 5, length: int = 64) -> dict:
    """Median step time eager and compiled (after ``WARMUP`` steps), the ratio, and the compilation's cost."""
    config = context.config
    image_batch, text_batch = 64 * SCALE, 32 * SCALE
    results = {}
    options = {"backend": config.compile_backend}
    # A fresh, empty inductor cache (torch's own helper: it also clears the caches that remember the folder), so the
    # compile time is the cold one; the previous cache folder is back afterwards.
    with fresh_cache():
        data = digits(config)
        results["image"] = _compare(
            "image", lambda compiled: default_model(config, compile=compiled and options), data, steps
        )
        tokens = TokenData((steps + WARMUP) * text_batch, length, text_batch)
        results["text"] = _compare(
            "text",
            lambda compiled: TextClassifier(
                config.text_encoder, num_classes=2, lr=1e-4, backbone_lr=1e-4, compile=compiled and options
            ),
            tokens,
            steps,
        )
    torch.compiler.reset()
    labels = {
        "image": f"image: {config.backbone}, {config.image_size} px, batch {image_batch}",
        "text": f"text: {config.text_encoder}, batch {text_batch} x {length} tokens",
    }
    rows = []
    for name, r in results.items():
        for side in ("eager", "compiled"):
            rows.append([f"{labels[name]}, {side}", r[side]["step_s"], r[side]["first_steps_s"]])
    faster = {name: r["speedup"] > 1.05 for name, r in results.items()}
    notes = []
    for name, r in results.items():
        if r["break_even_steps"] is None:
            verdict = f"its {r['compile_s']:.0f} s of compilation never pay off: keep model.compile off on this device"
        else:
            verdict = (
                f"the {r['compile_s']:.0f} s of compilation are paid back after about {r['break_even_steps']:.0f} "
                "steps (and paid again at each phase change of a freezing strategy)"
            )
        notes.append(f"{name}: compiled runs {r['speedup']:.2f}x the eager speed; {verdict}")
    return {
        "title": f"torch.compile (model.compile) vs eager on {'the GPU' if CUDA else 'the CPU'}: one training step",
        "setup": f"full fine-tuning (NoFreeze), fp32, inductor with an empty cache; median of {steps} steps after "
        f"{WARMUP} first steps, whose extra time over eager is the compile time",
        "columns": ["model", "step s (median)", f"first {WARMUP} steps s"],
        "rows": rows,
        "ratio": {
            **{f"{name}: eager / compiled step time": r["speedup"] for name, r in results.items()},
            **{f"{name}: compile time (s)": r["compile_s"] for name, r in results.items()},
        },
        "goal": "compiled steps at least 5% faster than eager (then model.compile is worth its compile time on "
        "long runs)",
        "goal_met": all(faster.values()),
        "note": "; ".join(notes),
        **results,
    }
