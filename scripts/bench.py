"""Benchmarks (never timed tests): each comparison runs both sides in this one process, same model, data and batch.

    python scripts/bench.py [--only frozen_vs_full] [--steps 8]
    make bench

Sections:
    frozen_vs_full: the time and memory of a training step through Lightning with the backbone frozen by the engine
        (``callbacks.unfreezing.Freeze``) vs fully trained (``NoFreeze``), on the default model (EfficientNet-Lite0
        on 64 px digits, batch 64). Memory is the activation memory autograd keeps for the backward pass (bytes of the
        distinct tensors saved by the forward, measured with ``saved_tensors_hooks``), plus the CUDA peak on a GPU.
    text: all-MiniLM-L6-v2 fine-tuned on 2,000 sentences of ``../shared/data/sst2/train.tsv`` for one epoch at one
        peak LR, evaluated on ``glue_dev.tsv``: (1) this template (dynamic padding, length-grouped batches, warmup +
        linear decay); (2) a plain loop as a practitioner first writes it (every batch padded to 128 tokens, Adam at a
        constant LR); (3) Hugging Face's ``Trainer`` with its usual settings (dynamic padding, linear decay).
        Training samples/s (the training loop only) and accuracy. Skipped when the data is absent.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

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


SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"


class EpochTimer(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def _text_template(train_rows, dev_rows, lr, epochs, batch_size, tmp) -> dict:
    from callbacks.lr_schedule import LRSchedule
    from datamodules.text_classification import TextClassificationDataModule
    from modules.text_classifier import TextClassifier

    for name, rows in (("train.tsv", train_rows), ("dev.tsv", dev_rows)):
        lines = ["sentence\tlabel", *(f"{r['sentence']}\t{r['label']}" for r in rows)]
        (tmp / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = TextClassificationDataModule(str(tmp), batch_size=batch_size, cache_dir=str(tmp / "cache"))
    model = TextClassifier("all-minilm-l6-v2", lr=lr, backbone_lr=lr)
    timer = EpochTimer()
    trainer = Trainer(
        max_epochs=epochs,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LRSchedule("linear", warmup=0.1), timer],
    )
    trainer.fit(model, data)
    accuracy = trainer.test(model, data, verbose=False)[0]["test/acc"]
    return {"samples_per_s": len(train_rows) * epochs / timer.seconds, "accuracy": accuracy}


def _hf_model():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from modules.text_encoder import minilm_path

    path = str(minilm_path())
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), AutoTokenizer.from_pretrained(path)


def _accuracy(model, tokenizer, rows, batch_size: int = 64) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            batch = tokenizer([r["sentence"] for r in chunk], padding=True, truncation=True, return_tensors="pt")
            predicted = model(**batch).logits.argmax(-1)
            right += (predicted == torch.tensor([int(r["label"]) for r in chunk])).sum().item()
    return right / len(rows)


def _text_plain_loop(train_rows, dev_rows, lr, epochs, batch_size, tmp) -> dict:
    model, tokenizer = _hf_model()
    encoded = tokenizer(
        [r["sentence"] for r in train_rows], padding="max_length", max_length=128, truncation=True, return_tensors="pt"
    )
    labels = torch.tensor([int(r["label"]) for r in train_rows])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(labels)).split(batch_size):
            loss = model(
                input_ids=encoded["input_ids"][idx],
                attention_mask=encoded["attention_mask"][idx],
                token_type_ids=encoded["token_type_ids"][idx],
                labels=labels[idx],
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    return {"samples_per_s": len(labels) * epochs / seconds, "accuracy": _accuracy(model, tokenizer, dev_rows)}


def _text_hf_trainer(train_rows, dev_rows, lr, epochs, batch_size, tmp) -> dict:
    from transformers import DataCollatorWithPadding, TrainingArguments
    from transformers import Trainer as HFTrainer

    model, tokenizer = _hf_model()
    features = [
        {**tokenizer(r["sentence"], truncation=True, max_length=128), "labels": int(r["label"])} for r in train_rows
    ]
    args = TrainingArguments(
        output_dir=str(tmp / "hf"),
        per_device_train_batch_size=batch_size,
        num_train_epochs=epochs,
        learning_rate=lr,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = HFTrainer(
        model=model, args=args, train_dataset=features, data_collator=DataCollatorWithPadding(tokenizer)
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"samples_per_s": len(features) * epochs / seconds, "accuracy": _accuracy(model, tokenizer, dev_rows)}


def text(steps: int = 0, samples: int = 2000, lr: float = 1e-4, epochs: int = 1, batch_size: int = 32) -> dict:
    """This template vs a practitioner's first loop vs the Hugging Face Trainer, same model, data, epochs, LR."""
    import tempfile

    from datamodules.text_classification import read_rows, sample_rows

    if not SST2.is_dir():
        return {"skipped": f"{SST2} is absent"}
    train_rows = sample_rows(read_rows(SST2 / "train.tsv"), samples, seed=0)
    dev_rows = read_rows(SST2 / "glue_dev.tsv")
    results = {}
    for name, run in (("template", _text_template), ("plain_loop", _text_plain_loop), ("hf_trainer", _text_hf_trainer)):
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = run(train_rows, dev_rows, lr, epochs, batch_size, Path(tmp))
        print(f"text/{name}: {results[name]}", file=sys.stderr, flush=True)
    ours = results["template"]["samples_per_s"]
    results["template/plain_loop speed"] = ours / results["plain_loop"]["samples_per_s"]
    results["template/hf_trainer speed"] = ours / results["hf_trainer"]["samples_per_s"]
    results["goal"] = ">= 2x the plain loop and >= 1.3x the Trainer in samples/s, at equal or better accuracy"
    results["goal_met"] = (
        results["template/plain_loop speed"] >= 2
        and results["template/hf_trainer speed"] >= 1.3
        and results["template"]["accuracy"] >= max(results["plain_loop"]["accuracy"], results["hf_trainer"]["accuracy"])
    )
    return results


SECTIONS = {"frozen_vs_full": frozen_vs_full, "text": text}


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
