"""Benchmarks (never timed tests): each comparison runs both sides in this one process, same model, data and batch.

    python scripts/bench.py [--only frozen_vs_full] [--steps 8]
    make bench

Sections:
    frozen_vs_full: the time and memory of a training step through Lightning with the backbone frozen by the engine
        (``callbacks.unfreezing.Freeze``) vs fully trained (``NoFreeze``), on the default model (EfficientNet-Lite0
        on 64 px digits, batch 64). Memory is the activation memory autograd keeps for the backward pass (bytes of the
        distinct tensors saved by the forward, measured with ``saved_tensors_hooks``), plus the CUDA peak on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from lightning import Callback, Trainer

from callbacks.unfreezing import Freeze, NoFreeze
from datamodules.digits import DigitsDataModule
from modules.image_classifier import ImageClassifier


class StepCost(Callback):
    """Wall time of each training batch (forward, backward, optimizer step) and the bytes autograd saved for it."""

    def __init__(self, warmup: int = 2):
        self.warmup, self.times, self.saved = warmup, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        storages: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        self._storages = storages
        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self._hooks.__enter__()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._start
        self._hooks.__exit__(None, None, None)
        if batch_idx >= self.warmup:
            self.times.append(elapsed)
            self.saved.append(sum(self._storages.values()))
            if torch.cuda.is_available():
                self.cuda_peak = torch.cuda.max_memory_allocated()


def frozen_vs_full(steps: int = 8, image_size: int = 64, batch_size: int = 64) -> dict:
    """Step time and saved activation memory with the backbone frozen vs trained, same model and batches."""
    results = {}
    for name, strategy in (("full", NoFreeze()), ("frozen", Freeze())):
        torch.manual_seed(0)
        model = ImageClassifier("efficientnet_lite0", num_classes=10)
        data = DigitsDataModule(image_size=image_size, batch_size=batch_size, augment="none")
        cost = StepCost()
        trainer = Trainer(
            max_epochs=1,
            limit_train_batches=steps + cost.warmup,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[strategy, cost],
        )
        trainer.fit(model, data)
        median = sorted(cost.times)[len(cost.times) // 2]
        results[name] = {
            "step_s": median,
            "saved_activations_mb": max(cost.saved) / 2**20,
            **({"cuda_peak_mb": cost.cuda_peak / 2**20} if torch.cuda.is_available() else {}),
        }
    results["frozen/full time"] = results["frozen"]["step_s"] / results["full"]["step_s"]
    results["frozen/full activations"] = (
        results["frozen"]["saved_activations_mb"] / results["full"]["saved_activations_mb"]
    )
    results["goal"] = "frozen step costs at most half of the full one"
    results["goal_met"] = results["frozen/full time"] <= 0.5
    return results


SECTIONS = {"frozen_vs_full": frozen_vs_full}


def machine() -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side")
    args = parser.parse_args()
    report = {"machine": machine()}
    for name in args.only or SECTIONS:
        report[name] = SECTIONS[name](steps=args.steps)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
