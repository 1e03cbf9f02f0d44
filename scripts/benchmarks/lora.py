"""LoRA vs full fine-tuning of all-MiniLM-L6-v2: one training step's time, the activations autograd saves for it,
the memory of gradients and AdamW state, and the checkpoint size; same model, batches (synthetic token ids, batch
32 of 64 tokens, times ``SCALE``) and settings both ways, with ``configs/presets/lora.yaml``'s adapters."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
import yaml
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from callbacks.unfreezing import NoFreeze
from modules.text_classifier import TextClassifier
from scripts.benchmarks.harness import CUDA, REPO, SCALE, Context, StepCost, quiet_trainer


class _Tokens(Dataset):
    def __init__(self, count: int, length: int, vocab: int = 30522):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1000, vocab, (count, length), generator=generator)
        self.labels = torch.randint(0, 2, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[index]}


class _Data(LightningDataModule):
    def __init__(self, count: int, length: int, batch_size: int):
        super().__init__()
        self.data, self.batch_size = _Tokens(count, length), batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


def run(context: Context, steps: int = 6, length: int = 64) -> dict:
    lora = yaml.safe_load((REPO / "configs" / "presets" / "lora.yaml").read_text())["model"]["init_args"]["lora"]
    batch_size = 32 * SCALE
    results = {}
    for name, settings in (("full", None), ("lora", lora)):
        torch.manual_seed(0)
        model = TextClassifier("all-minilm-l6-v2", num_classes=2, lr=1e-4, backbone_lr=1e-4, lora=settings)
        cost = StepCost()
        trainer = quiet_trainer(limit_train_batches=steps + cost.warmup, callbacks=[NoFreeze(), cost])
        trainer.fit(model, _Data((steps + cost.warmup) * batch_size, length, batch_size))
        trainable = [p for p in model.parameters() if p.requires_grad]
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.ckpt"
            trainer.save_checkpoint(path)
            ckpt_mb = path.stat().st_size / 2**20
        results[name] = {
            "trainable_params": sum(p.numel() for p in trainable),
            "step_s": statistics.median(cost.times),
            "saved_activations_mb": max(cost.saved) / 2**20,
            # fp32 gradients plus AdamW's two moments for every trainable parameter
            "grads_and_adamw_mb": 3 * 4 * sum(p.numel() for p in trainable) / 2**20,
            "checkpoint_mb": ckpt_mb,
            **({"cuda_peak_mb": cost.cuda_peak / 2**20} if CUDA else {}),
        }
    full, adapted = results["full"], results["lora"]
    ratios = {
        "lora / full step time": adapted["step_s"] / full["step_s"],
        "lora / full activation memory": adapted["saved_activations_mb"] / full["saved_activations_mb"],
        "lora / full gradient + optimizer memory": adapted["grads_and_adamw_mb"] / full["grads_and_adamw_mb"],
        "lora / full checkpoint size": adapted["checkpoint_mb"] / full["checkpoint_mb"],
    }
    columns = ["fine-tuning", "trainable parameters", "step s (median)", "activations saved (MiB)",
               "grads + AdamW (MiB)", "checkpoint (MiB)"]  # fmt: skip
    if CUDA:
        columns.append("CUDA peak (MiB)")
    return {
        "title": "LoRA vs full fine-tuning: all-MiniLM-L6-v2, one training step",
        "setup": f"r={lora['r']} on {lora['target_modules']}, batch {batch_size} x {length} tokens, "
        f"{steps} timed steps",
        "columns": columns,
        "rows": [[name, *r.values()] for name, r in results.items()],
        "ratio": ratios,
        "goal": "LoRA trains under 2% of the parameters and its checkpoint is under a tenth of the full one's",
        "goal_met": adapted["trainable_params"] < 0.02 * full["trainable_params"]
        and ratios["lora / full checkpoint size"] < 0.1,
        **results,
    }
