"""int8 vs fp32 for CPU inference (``modules/quantize.py``, what ``make export QUANTIZE=int8`` writes): latency at batch
1 and 32, file size and, for the image model, test accuracy, both sides in this process on the same inputs.

Image: the default experiment's fp32 run (shared with ``precision``), quantized with PT2E static int8 calibrated on 4
validation batches, saved, loaded back and lowered to oneDNN int8 kernels. Text: all-MiniLM-L6-v2 with a 2-class head
(its latency and size do not depend on the head's training), int8 linear layers through torchao. Latency is the
median of interleaved calls (fp32, int8, fp32, ...) after warm-up, on the CPU even where a GPU is present."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import torch

from modules.quantize import INT8_FILE, accuracy, load_int8, quantize_int8, save_int8
from scripts.benchmarks.harness import Context

SENTENCES = [
    "a gripping , funny and ultimately moving film that never loses its way .",
    "the plot is thin and the jokes land with a dull thud .",
    "an intelligent , well-acted drama about grief .",
    "it 's a bore from start to finish , and far too long .",
]


@torch.no_grad()
def latencies(models: dict[str, Callable], inputs, reps: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each model on ``inputs``, the calls interleaved so that load on the machine falls on
    every side alike."""
    for model in models.values():
        for _ in range(warmup):
            model(inputs)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(reps):
        for name, model in models.items():
            start = time.perf_counter()
            model(inputs)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def fp32_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _image(context: Context, folder: Path) -> dict:
    run = context.default_run("32-true")
    model, data = run.model.cpu().eval(), run.data
    data.setup("test")
    calibration = [images for images, _ in islice(data.val_dataloader(), 4)]
    path = save_int8(quantize_int8(model, calibration), folder / f"image_{INT8_FILE}")
    int8 = load_int8(path)
    test = list(data.test_dataloader())
    side = calibration[0].shape[-1]
    images = torch.rand(32, 3, side, side, generator=torch.Generator().manual_seed(0))
    return {
        "latency": {n: latencies({"fp32": model, "int8": int8}, images[:n]) for n in (1, 32)},
        "bytes": {"fp32": fp32_bytes(model), "int8": path.stat().st_size},
        "accuracy": {"fp32": accuracy(model, test)[0], "int8": accuracy(int8, test)[0]},
        "name": f"{context.config.backbone}, {side} px",
    }


def _text(folder: Path) -> dict:
    from transformers import AutoTokenizer

    from modules.text_classifier import TextClassifier

    torch.manual_seed(0)
    model = TextClassifier("all-minilm-l6-v2", num_classes=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(model.tokenizer_path)
    batch = dict(tokenizer((SENTENCES * 8)[:32], padding=True, return_tensors="pt"))
    path = save_int8(quantize_int8(model, [batch]), folder / f"text_{INT8_FILE}")
    int8 = load_int8(path)
    one = {k: v[:1] for k, v in batch.items()}
    return {
        "latency": {
            1: latencies({"fp32": model, "int8": int8}, one),
            32: latencies({"fp32": model, "int8": int8}, batch),
        },
        "bytes": {"fp32": fp32_bytes(model), "int8": path.stat().st_size},
        "accuracy": None,
        "name": f"all-MiniLM-L6-v2, {batch['input_ids'].shape[1]} tokens",
    }


def run(context: Context) -> dict:
    """The table (one row per model and precision) and the int8 / fp32 ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        results = {"image": _image(context, Path(tmp)), "text": _text(Path(tmp))}
    rows, ratio = [], {}
    for kind, r in results.items():
        for precision in ("fp32", "int8"):
            acc = r["accuracy"][precision] if r["accuracy"] else "not measured: see the note"
            lat = [1000 * r["latency"][n][precision] for n in (1, 32)]
            rows.append([f"{r['name']}: {precision}", *lat, r["bytes"][precision] / 1e6, acc])
        for n in (1, 32):
            ratio[f"{kind}: int8 / fp32 latency, batch {n}"] = r["latency"][n]["int8"] / r["latency"][n]["fp32"]
        ratio[f"{kind}: int8 / fp32 size"] = r["bytes"]["int8"] / r["bytes"]["fp32"]
        if r["accuracy"]:
            ratio[f"{kind}: int8 - fp32 test acc"] = r["accuracy"]["int8"] - r["accuracy"]["fp32"]
    faster = [k for k, r in results.items() if r["latency"][32]["int8"] < r["latency"][32]["fp32"]]
    return {
        "title": "int8 vs fp32 for CPU inference (`make export QUANTIZE=int8`)",
        "setup": "latency: median of 10 interleaved calls after 2 warm-up calls, eager (the image program lowered to "
        "oneDNN int8 kernels, the text program with int8 matmuls); size: the int8 .pt2 file vs the fp32 weights; "
        "image accuracy: the default experiment's test split",
        "columns": ["model", "batch 1 ms", "batch 32 ms", "MB", "test acc"],
        "rows": rows,
        "ratio": ratio,
        "note": (
            f"int8 is faster at batch 32 for: {', '.join(faster) or 'neither'}. The text model's accuracy is not "
            "measured here (its head is untrained): `make export CKPT=... QUANTIZE=int8` checks it on the run's test "
            "split. Most of MiniLM's fp32 bytes are its token embeddings, which stay float"
        ),
        **results,
    }
