"""What the benchmark sections share, and nothing that outlives a bench invocation: the settings, the
:class:`Context` that hands each section what earlier sections produced, and the pieces they measure with (a quiet
trainer, timers, the FLOP counter, the default experiment's model, data and end-to-end runs)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import yaml
from lightning import Callback, LightningDataModule, LightningModule, Trainer

from datamodules.digits import DigitsDataModule
from modules.image_classifier import ImageClassifier

REPO = Path(__file__).resolve().parents[2]
SST2 = REPO.parent / "shared" / "data" / "sst2"
DEFAULT_CONFIG = REPO / "configs" / "digits.yaml"
CUDA = torch.cuda.is_available()
SCALE = 4 if CUDA else 1  # batch-size multiplier on a GPU
DEVICE = torch.device("cuda" if CUDA else "cpu")


@dataclass(frozen=True)
class BenchConfig:
    """The settings sections read: the command line's, and the sizes a quick run (the tests) shrinks; the defaults
    are the default experiment's."""

    samples: int = 2000  # SST-2 training sentences of the text section
    reps: int = 3  # timed epochs per side in the overhead section
    full_bf16_run: bool = False  # train the default experiment in bf16 even where bf16 is slow
    backbone: str = "efficientnet_lite0"  # the image model the in-process sections train
    image_size: int = 64
    digits: Mapping[str, Any] = field(default_factory=dict)  # more DigitsDataModule arguments (a smaller split)
    experiment_args: tuple[str, ...] = ()  # more CLI arguments for the default experiment's end-to-end runs
    sst2: Path = SST2  # the text section's data: train.tsv and glue_dev.tsv
    text_encoder: str = "all-minilm-l6-v2"  # the text model of the compile section (the tests: bert-tiny)
    compile_backend: str = "inductor"  # the compile section's torch.compile backend (the tests: aot_eager, fast)


@dataclass(frozen=True)
class DefaultRun:
    """One end-to-end run of the default experiment: its measurements, and its model (best checkpoint loaded) and
    data module, for sections that evaluate it further."""

    result: dict
    model: LightningModule
    data: LightningDataModule


class Context:
    """One bench invocation as a section sees it, passed in explicitly: the settings, the results of the sections that
    ran before (read-only: ``efficiency`` reuses their throughput) and the default experiment's runs, trained once per
    (precision, pretrained) however many sections ask. A new Context runs a section alone."""

    def __init__(self, config: BenchConfig | None = None):
        self.config = config or BenchConfig()
        self._results: dict[str, dict] = {}
        self._runs: dict[tuple[str, bool], DefaultRun] = {}

    @property
    def earlier(self) -> Mapping[str, dict]:
        return MappingProxyType(self._results)

    def record(self, name: str, result: dict) -> None:
        """Keep a finished section's result for the sections after it (the runner's job, not a section's)."""
        self._results[name] = result

    def default_run(self, precision: str = "32-true", pretrained: bool = True) -> DefaultRun:
        key = (precision, pretrained)
        if key not in self._runs:
            self._runs[key] = train_default(self.config, precision, pretrained)
        return self._runs[key]


@contextmanager
def environ_restored() -> Iterator[None]:
    """Put the environment back as it was: the CLI's ``seed_everything`` leaves ``PL_GLOBAL_SEED`` behind, and the
    data modules' shuffling order follows it, so a section would otherwise train on another order after it."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def sync() -> None:
    """Wait for the GPU, so a timer stops after the work it times."""
    if CUDA:
        torch.cuda.synchronize()


def quiet_trainer(**kwargs) -> Trainer:
    """One epoch on one device with no validation, logging, checkpoints or progress bar, unless ``kwargs`` say."""
    defaults = dict(
        accelerator="auto",
        devices=1,
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(**(defaults | kwargs))


def digits(config: BenchConfig, **kwargs) -> DigitsDataModule:
    """The default experiment's data (set up for fit), batch 64 (times ``SCALE``)."""
    data = DigitsDataModule(
        image_size=config.image_size, batch_size=64 * SCALE, augment="basic", **{**config.digits, **kwargs}
    )
    data.setup("fit")
    return data


def default_model(config: BenchConfig, **kwargs) -> ImageClassifier:
    """The default experiment's model and optimizer settings (``configs/digits.yaml``) on ``config.backbone``, with
    ``kwargs`` (more :class:`ImageClassifier` arguments, such as ``compile``)."""
    return ImageClassifier(
        config.backbone,
        num_classes=10,
        pretrained=True,
        dropout=0.2,
        label_smoothing=0.1,
        lr=0.005,
        backbone_lr=0.002,
        weight_decay=0.01,
        **kwargs,
    )


class TrainTimer(Callback):
    """Seconds and samples of the training loop only (validation inside an epoch is subtracted)."""

    def __init__(self):
        self.seconds, self.samples, self.tokens, self.epochs = 0.0, 0, 0, []

    def on_train_epoch_start(self, trainer, pl_module):
        sync()
        self._start, self._val = time.perf_counter(), 0.0

    def on_validation_start(self, trainer, pl_module):
        if trainer.training:
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if trainer.training:
            self._val += time.perf_counter() - self._val_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(batch, Mapping):  # tokenized text (a BatchEncoding): padded tokens too
            self.samples += len(batch["labels"])
            self.tokens += batch["input_ids"].numel()
        else:
            self.samples += len(batch[1])

    def on_train_epoch_end(self, trainer, pl_module):
        sync()
        seconds = time.perf_counter() - self._start - self._val
        self.epochs.append(seconds)
        self.seconds += seconds

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


class StepCost(Callback):
    """Wall time of each training batch (forward, backward, optimizer step) and the bytes autograd saved for it."""

    def __init__(self, warmup: int = 2):
        self.warmup, self.times, self.saved, self.cuda_peak = warmup, [], [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        storages: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        self._storages = storages
        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self._hooks.__enter__()
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync()
        elapsed = time.perf_counter() - self._start
        self._hooks.__exit__(None, None, None)
        if batch_idx >= self.warmup:
            self.times.append(elapsed)
            self.saved.append(sum(self._storages.values()))
            if CUDA:
                self.cuda_peak = max(self.cuda_peak or 0, torch.cuda.max_memory_allocated())


def _conv_backward_flops(
    grad_out_shape,
    x_shape,
    w_shape,
    bias,
    stride,
    padding,
    dilation,
    transposed,
    output_padding,
    groups,
    output_mask,
    **kwargs,
) -> int:
    """Our formula for a convolution's backward: each gradient asked for (input, weight) costs one forward.

    torch's own formula (torch 2.14) ignores ``groups`` there and overcounts a depthwise convolution's backward by
    its channel count (32x for 32 channels): EfficientNet-Lite0 came out at 14 times its true training FLOPs."""
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


def training_flops(model: torch.nn.Module, batch: Any, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]) -> int:
    """FLOPs of one forward and backward pass on ``batch`` (matmuls and convolutions, counted by torch's
    FlopCounterMode with our convolution-backward formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        loss_fn(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def train_default(config: BenchConfig, precision: str, pretrained: bool) -> DefaultRun:
    """One run of the default experiment (``configs/digits.yaml``, its seed and recipe) through the CLI, logged to
    a temporary folder: test accuracy (of the best checkpoint), fit wall time and training samples/s. Use
    :meth:`Context.default_run`, which trains each (precision, pretrained) once."""
    from scripts.train import main as train

    with tempfile.TemporaryDirectory() as tmp:
        override = Path(tmp) / "bench.yaml"
        logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": tmp, "name": "run"}}
        override.write_text(yaml.safe_dump({"trainer": {"logger": [logger]}}))
        args = ["fit", "--config", str(DEFAULT_CONFIG), "--config", str(override)]
        args += ["--trainer.precision", precision, "--model.pretrained", str(pretrained).lower()]
        args += ["--trainer.callbacks+=scripts.benchmarks.harness.TrainTimer"]
        if SCALE > 1:
            args += ["--data.batch_size", str(64 * SCALE)]
        cli = train(args + list(config.experiment_args))
        timer = next(c for c in cli.trainer.callbacks if isinstance(c, TrainTimer))
    result = {
        "test_acc": cli.results["test"]["test/acc"],
        "fit_s": cli.results["wall_s"],
        "train_samples_per_s": timer.samples_per_s,
        "epochs": cli.trainer.current_epoch,
    }
    print(f"[bench] default experiment {precision} pretrained={pretrained}: {result}", file=sys.stderr, flush=True)
    # The CLI's test after fit loaded the best checkpoint into the model.
    return DefaultRun(result, cli.model, cli.datamodule)
