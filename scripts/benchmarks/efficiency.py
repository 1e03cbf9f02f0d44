"""Efficiency against the machine's limit: training FLOPs per sample (counted by ``torch.utils.flop_counter`` over a
forward and backward) times samples/s, over the peak matmul FLOP/s measured here; with the top operators of a
profile of the training step, which say what limits it. The throughputs are those ``overhead`` and ``text`` measured
earlier in the same invocation when they ran (``overhead`` is measured briefly here when it did not)."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from scripts.benchmarks import overhead
from scripts.benchmarks.harness import CUDA, DEVICE, Context, default_model, digits, sync, training_flops


def peak_matmul(dtype: torch.dtype, max_size: int | None = None, seconds: float = 1.0) -> float:
    """Best FLOP/s of a square matmul on this device: the size doubles from 256 while one product takes under 50 ms
    (up to ``max_size``), so a dtype without fast kernels is measured small instead of for minutes."""
    max_size = max_size or (8192 if CUDA else 2048)
    size, best = 256, 0.0
    while True:
        a = torch.randn(size, size, device=DEVICE).to(dtype)
        b = torch.randn(size, size, device=DEVICE).to(dtype)
        a @ b
        fastest, runs = math.inf, 0
        deadline = time.perf_counter() + seconds / 4
        while time.perf_counter() < deadline or runs < 3:
            runs += 1
            sync()
            start = time.perf_counter()
            a @ b
            sync()
            fastest = min(fastest, time.perf_counter() - start)
        best = max(best, 2 * size**3 / fastest)
        if size >= max_size or fastest > 0.05:
            return best
        size *= 2


def _profile_top(model: torch.nn.Module, loader: DataLoader, steps: int = 4, top: int = 8) -> list[list]:
    """Self time of the top operators over ``steps`` training steps (forward, backward, AdamW)."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = model.configure_optimizers()
    batches = list(itertools.islice(loader, steps + 1))

    def step(images, labels):
        loss = F.cross_entropy(model(images.to(DEVICE)), labels.to(DEVICE))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(*batches[0])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=activities) as prof:
        for images, labels in batches[1:]:
            step(images, labels)
    sync()
    events = prof.key_averages()
    attr = "self_device_time_total" if CUDA else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    return [[e.key, getattr(e, attr) / 1e3 / steps, getattr(e, attr) / total] for e in ranked]


def run(context: Context) -> dict:
    """Achieved over peak FLOP/s of the image model (template and plain loop) and, when ``text`` ran, of MiniLM."""
    config = context.config
    peak32, peak16 = peak_matmul(torch.float32), peak_matmul(torch.bfloat16)
    torch.manual_seed(0)
    data = digits(config)
    model = default_model(config).to(DEVICE)
    images, labels = next(iter(data.train_dataloader()))
    images, labels = images.to(DEVICE), labels.to(DEVICE)
    flops = training_flops(model, (images, labels), lambda m, b: F.cross_entropy(m(b[0]), b[1])) / len(labels)
    measured = context.earlier.get("overhead", {}).get("samples_per_s")
    if not measured:
        measured = overhead.run(Context(replace(config, reps=1)))["samples_per_s"]
    rows = [
        [f"image: {name}", flops / 1e9, sps, flops * sps / 1e9, flops * sps / peak32]
        for name, sps in (("template", measured["template"]), ("plain loop", measured["plain"]))
    ]
    text_result = context.earlier.get("text", {})
    if "template_flops" in text_result:
        f, sps = text_result["template_flops"], text_result["template"]["samples_per_s"]
        rows.append(["text: template (MiniLM, SST-2)", f / 1e9, sps, f * sps / 1e9, f * sps / peak32])
    profile = _profile_top(model, data.train_dataloader())
    return {
        "title": "Efficiency against the machine's limit (fp32)",
        "setup": f"peak = the best square matmul FLOP/s measured now (up to {'8192' if CUDA else '2048'}^2); "
        "FLOPs counted by torch.utils.flop_counter over one forward + backward",
        "columns": ["workload", "training GFLOP/sample", "samples/s", "achieved GFLOP/s", "fraction of fp32 peak"],
        "rows": rows,
        "peak_gflops": {"fp32": peak32 / 1e9, "bf16": peak16 / 1e9},
        "profile": {
            "title": "Where a training step of the default model spends its time (torch.profiler, self time)",
            "columns": ["operator", "ms per step", "share"],
            "rows": profile,
        },
        "note": f"measured peak matmul: {peak32 / 1e9:.0f} GFLOP/s fp32, {peak16 / 1e9:.0f} GFLOP/s bf16; the top "
        f"operator of the image step is {profile[0][0]} ({profile[0][2]:.0%} of its time)",
    }
