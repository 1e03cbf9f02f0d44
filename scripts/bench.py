"""`make bench`: the performance picture, measured side by side. Both sides of every comparison run in this one
process, on the same model, data, batch size and precision, and are reported as ratios.

    python scripts/bench.py [--only overhead text ...] [--out bench] [--samples 2000] [--reps 3]
    make bench                 # all sections, about 15 minutes on 2 CPU cores; bench/results.md and results.json

Sections (``--only`` picks some; the default experiment is ``configs/digits.yaml``: EfficientNet-Lite0 on 64 px
digits, batch 64):
    overhead: a training epoch through our LightningModule and Trainer (the template's LR schedule callback, CSV
        logging, train accuracy) vs a plain PyTorch loop doing the same work (same module, loader, optimizer
        groups and LR schedule). Epochs are interleaved (Lightning, plain, Lightning, ...); the first pair warms up.
        Goal: at least 0.97 of the plain loop's samples/s.
    loader_workers: the same Lightning epoch with the data module's ``num_workers`` at 0 and at 2 (the data is in
        memory; augmentation runs in the workers or in the main process).
    frozen_vs_full: step time and activation memory of a training step with the backbone frozen by the engine vs
        fully trained.
    precision: the default experiment trained end to end in fp32 and in bf16-mixed autocast: training samples/s
        and test accuracy.
    pretrained_vs_scratch: the default experiment from ImageNet weights vs from random weights (same recipe,
        seed and split): test accuracy. Reuses the fp32 run of ``precision`` when both run.
    efficiency: training FLOPs per sample (counted by ``torch.utils.flop_counter`` over a forward and backward)
        times samples/s, over the peak matmul FLOP/s measured here; with the top operators of a profile of the
        training step, which say what limits it.
    text: all-MiniLM-L6-v2 fine-tuned on ``--samples`` sentences of ``../shared/data/sst2/train.tsv`` for one
        epoch at one peak LR, evaluated on ``glue_dev.tsv``: this template (dynamic padding, length-grouped
        batches, warmup + linear decay) vs a plain loop as a practitioner first writes it (every batch padded to
        128 tokens, Adam at one constant LR) vs Hugging Face's ``Trainer`` (dynamic padding, linear decay).
        Skipped, with a note, when the data is absent.
    lora: all-MiniLM-L6-v2 with ``configs/presets/lora.yaml``'s adapters vs fully fine-tuned: trainable parameters,
        step time, activations saved for backward, gradient + AdamW memory and checkpoint size, same batches.
    compile: a training step eager vs with ``model.compile`` (``torch.compile`` of the backbone, inductor) for the
        default image experiment and for all-MiniLM-L6-v2 (batch 32 of 64 tokens): step time after the first steps,
        and the compile time those first steps pay (cold inductor cache).

On a GPU the batch sizes are 4 times larger and the device is recorded; nothing else changes.
"""

from __future__ import annotations

from scripts.benchmarks import (
    cli,
    compile,
    efficiency,
    frozen_vs_full,
    loader_workers,
    lora,
    overhead,
    precision,
    pretrained_vs_scratch,
    quantization,
    text,
)
from scripts.benchmarks.cli import Section

# The sections, one module each under scripts/benchmarks/, in the order they run.
SECTIONS: dict[str, Section] = {
    "overhead": overhead.run,
    "loader_workers": loader_workers.run,
    "frozen_vs_full": frozen_vs_full.run,
    "precision": precision.run,
    "pretrained_vs_scratch": pretrained_vs_scratch.run,
    "text": text.run,
    "lora": lora.run,
    "compile": compile.run,
    "quantization": quantization.run,  # after precision: it quantizes that section's fp32 run
    "efficiency": efficiency.run,  # last: it reuses the throughput overhead and text measured
}


def main(argv: list[str] | None = None) -> dict:
    """The command line above (``argv``: its arguments, default ``sys.argv``); returns the report it wrote."""
    return cli.main(SECTIONS, argv, description=__doc__)


if __name__ == "__main__":
    main()
