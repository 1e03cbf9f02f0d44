"""Text classification: all-MiniLM-L6-v2 fine-tuned on ``config.samples`` SST-2 sentences for one epoch at one peak
LR and evaluated on GLUE dev, three ways: this template (dynamic padding, length-grouped batches, warmup + linear
decay) vs a plain loop as a practitioner first writes it (every batch padded to 128 tokens, Adam at one constant LR)
vs Hugging Face's ``Trainer`` (dynamic padding, linear decay). Skipped, with a note, when the data is absent."""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from callbacks.lr_schedule import LRSchedule
from scripts.benchmarks.harness import CUDA, DEVICE, SCALE, Context, TrainTimer, quiet_trainer, sync, training_flops

LR, EPOCHS, BATCH_SIZE = 1e-4, 1, 32  # the same for the three sides; the batch is multiplied by SCALE


def _template(train_rows: list[dict], dev_rows: list[dict], lr: float, epochs: int, batch_size: int, tmp: Path) -> dict:
    from datamodules.text_classification import TextClassificationDataModule
    from modules.text_classifier import TextClassifier

    for name, rows in (("train.tsv", train_rows), ("dev.tsv", dev_rows)):
        lines = ["sentence\tlabel", *(f"{r['sentence']}\t{r['label']}" for r in rows)]
        (tmp / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = TextClassificationDataModule(str(tmp), batch_size=batch_size, cache_dir=str(tmp / "cache"))
    model = TextClassifier("all-minilm-l6-v2", num_classes=data.num_classes, lr=lr, backbone_lr=lr)
    timer = TrainTimer()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[LRSchedule("linear", warmup=0.1), timer])
    trainer.fit(model, data)
    accuracy = trainer.test(model, data, verbose=False)[0]["test/acc"]
    # Training FLOPs of the epoch: FLOPs per padded token, counted on one real batch, times the padded tokens the
    # epoch trained on (linear in tokens at these lengths: attention is a small share below 128).
    batch = {k: v.to(model.device) for k, v in next(iter(data.train_dataloader())).items()}
    flops = training_flops(model, batch, lambda m, b: F.cross_entropy(m(b), b["labels"]))
    per_token = flops / batch["input_ids"].numel()
    return {
        "samples_per_s": timer.samples_per_s,
        "accuracy": accuracy,
        "flops_per_sample": per_token * timer.tokens / timer.samples,
        "mean_padded_length": timer.tokens / timer.samples,
    }


def _hf_model() -> tuple:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from datamodules.tokenizers import minilm_path

    path = str(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).to(DEVICE)
    return model, AutoTokenizer.from_pretrained(path)


def _accuracy(model: torch.nn.Module, tokenizer, rows: list[dict], batch_size: int = 64) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            batch = tokenizer([r["sentence"] for r in chunk], padding=True, truncation=True, return_tensors="pt")
            predicted = model(**batch.to(DEVICE)).logits.argmax(-1).cpu()
            right += (predicted == torch.tensor([int(r["label"]) for r in chunk])).sum().item()
    return right / len(rows)


def _plain_loop(
    train_rows: list[dict], dev_rows: list[dict], lr: float, epochs: int, batch_size: int, tmp: Path
) -> dict:
    model, tokenizer = _hf_model()
    encoded = tokenizer(
        [r["sentence"] for r in train_rows], padding="max_length", max_length=128, truncation=True, return_tensors="pt"
    )
    labels = torch.tensor([int(r["label"]) for r in train_rows])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    sync()
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(labels)).split(batch_size):
            loss = model(
                input_ids=encoded["input_ids"][idx].to(DEVICE),
                attention_mask=encoded["attention_mask"][idx].to(DEVICE),
                token_type_ids=encoded["token_type_ids"][idx].to(DEVICE),
                labels=labels[idx].to(DEVICE),
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    sync()
    seconds = time.perf_counter() - start
    return {"samples_per_s": len(labels) * epochs / seconds, "accuracy": _accuracy(model, tokenizer, dev_rows)}


def _hf_trainer(
    train_rows: list[dict], dev_rows: list[dict], lr: float, epochs: int, batch_size: int, tmp: Path
) -> dict:
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
        use_cpu=not CUDA,
        seed=0,
        disable_tqdm=True,
    )
    trainer = HFTrainer(
        model=model, args=args, train_dataset=features, data_collator=DataCollatorWithPadding(tokenizer)
    )
    sync()
    start = time.perf_counter()
    trainer.train()
    sync()
    seconds = time.perf_counter() - start
    return {"samples_per_s": len(features) * epochs / seconds, "accuracy": _accuracy(model, tokenizer, dev_rows)}


def run(context: Context) -> dict:
    """Speed and dev accuracy of the three sides, same model, data, epochs and LR. Goals: >= 2x the plain loop and
    >= 1.3x the Trainer in samples/s, accuracy equal to or better than both."""
    from datamodules.text_classification import read_rows, sample_rows

    config = context.config
    if not config.sst2.is_dir():
        return {"skipped": f"{config.sst2} is absent: the text comparison needs ../shared/data/sst2"}
    batch_size = BATCH_SIZE * SCALE
    train_rows = sample_rows(read_rows(config.sst2 / "train.tsv"), config.samples, seed=0)
    dev_rows = read_rows(config.sst2 / "glue_dev.tsv")
    results = {}
    for name, side in (("template", _template), ("plain_loop", _plain_loop), ("hf_trainer", _hf_trainer)):
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = side(train_rows, dev_rows, LR, EPOCHS, batch_size, Path(tmp))
        print(f"[bench] text/{name}: {results[name]}", file=sys.stderr, flush=True)
    ours = results["template"]["samples_per_s"]
    vs_plain = ours / results["plain_loop"]["samples_per_s"]
    vs_hf = ours / results["hf_trainer"]["samples_per_s"]
    best_other = max(results["plain_loop"]["accuracy"], results["hf_trainer"]["accuracy"])
    fast = vs_plain >= 2 and vs_hf >= 1.3
    labels = {
        "template": "template (dynamic padding, length-grouped, warmup + linear decay)",
        "plain_loop": "plain loop (pad to 128, Adam, constant LR)",
        "hf_trainer": "Hugging Face Trainer (dynamic padding, linear decay)",
    }
    return {
        "title": "Text classification: the template vs a practitioner's first loop vs the Hugging Face Trainer",
        "setup": f"all-MiniLM-L6-v2, {config.samples} SST-2 training sentences, 1 epoch, peak LR {LR}, "
        f"batch {batch_size}, fp32; accuracy on GLUE dev ({len(dev_rows)} sentences)",
        "columns": ["side", "train samples/s", "dev accuracy"],
        "rows": [[labels[k], r["samples_per_s"], r["accuracy"]] for k, r in results.items()],
        "ratio": {"template / plain loop speed": vs_plain, "template / HF Trainer speed": vs_hf},
        "goals": [
            {"goal": ">= 2x the plain loop and >= 1.3x the Trainer in samples/s", "met": fast},
            {"goal": "accuracy equal to or better than both", "met": results["template"]["accuracy"] >= best_other},
        ],
        "goal_met": fast and results["template"]["accuracy"] >= best_other,
        "note": f"one seed: the standard error of a dev accuracy near {best_other:.2f} over {len(dev_rows)} sentences "
        f"is {math.sqrt(best_other * (1 - best_other) / len(dev_rows)):.3f}",
        "template_flops": results["template"]["flops_per_sample"],
        **results,
    }
