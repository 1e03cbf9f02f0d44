"""Export a checkpoint for serving; the model is rebuilt from the run's saved ``config.yaml``.

    python scripts/export.py CKPT [--out DIR] [--formats safetensors onnx torchscript]
    python scripts/export.py CKPT --quantize int8 [--calibration-batches 4] [--max-drop 0.01] [--eval-batches N]

* every model: ``model.safetensors`` (the weights) and ``config.json`` (model class, hyperparameters, class names,
  input size and normalization or tokenizer), loadable without Lightning;
* image classifiers also: ``model.onnx`` and ``model.ts`` (TorchScript), taking images in [0, 1] of shape
  (batch, 3, size, size) (normalization is inside) and returning logits, with a dynamic batch size.

Each exported graph is run once on random images and compared with the Lightning model; the largest difference is
printed, and one above ``--atol`` is an error.

``--quantize int8`` also writes ``model_int8.pt2``, a ``torch.export`` program of the classifier quantized to int8 for
CPU inference (``modules/quantize.py``: PT2E static quantization calibrated on ``--calibration-batches`` validation
batches for image models, torchao dynamic int8 linear layers for text models), loaded back with
``modules.quantize.load_int8``. Before it is kept, the float and the int8 model are both evaluated on the run's test
split (``--eval-batches`` batches; default all): ``config.json`` records both accuracies and the file sizes, and an
accuracy drop above ``--max-drop`` is an error (the int8 file is then removed).
"""

from __future__ import annotations

import argparse
import importlib
import json
from itertools import islice
from pathlib import Path

import torch

from modules.quantize import INT8_FILE, accuracy, int8_refusal, load_int8, quantize_int8, save_int8
from scripts.from_run import build_datamodule, load_run

FORMATS = ("safetensors", "onnx", "torchscript")
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the `export` extra of pyproject.toml: ONNX files only


def require_export_extra() -> None:
    """One line naming the ``export`` extra when a package the ONNX export needs is missing (before any work)."""
    missing = []
    for name in EXPORT_PACKAGES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            missing.append(name)
    if missing:
        raise ModuleNotFoundError(
            f"ONNX export needs {', '.join(missing)}, not installed: pip install -e '.[export]' "
            "(or leave ONNX out: --formats safetensors torchscript)"
        )


def export(
    ckpt: str,
    out: str | None = None,
    formats: tuple[str, ...] | None = None,
    config: str | None = None,
    atol: float = 1e-4,
    quantize: str | None = None,
    calibration_batches: int = 4,
    max_drop: float = 0.01,
    eval_batches: int | None = None,
    data_dir: str | None = None,
) -> dict[str, Path]:
    """Write the requested formats to ``out`` (default: ``export/`` in the run directory; None: every format the
    task supports: the graphs where it has a tensor input); returns their paths.

    ``quantize="int8"`` adds ``model_int8.pt2`` (see the module docstring): calibrated on ``calibration_batches``
    validation batches, checked on ``eval_batches`` test batches (None: all) of the run's data (``data_dir``: the
    data folder when it has moved), refused when the accuracy drops by more than ``max_drop``."""
    from safetensors.torch import save_file

    unknown = set(formats or ()) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}; choose from {FORMATS}")
    model, settings, run_dir = load_run(ckpt, config)
    model = model.for_export()  # the task protocol: LoRA adapters merged into plain layers (checked layer by layer)
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize {quantize}: only int8 is supported")
    if quantize and int8_refusal(model):
        raise ValueError(int8_refusal(model))
    if formats is None:
        formats = FORMATS if model.example_input() is not None else ("safetensors",)
    if "onnx" in formats:
        require_export_extra()
    folder = Path(out) if out else run_dir / "export"
    folder.mkdir(parents=True, exist_ok=True)
    hparams = {k: v for k, v in dict(model.hparams).items() if _jsonable(v)}
    meta = {"model_class": settings["model"]["class_path"], "hparams": hparams, "checkpoint": str(ckpt)}
    written: dict[str, Path] = {}
    meta |= model.export_meta()  # the task protocol: input shape and normalisation, tokenizer, ...
    if "safetensors" in formats:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"model_class": meta["model_class"]})
        written["safetensors"] = folder / "model.safetensors"
    graphs = [f for f in formats if f in ("onnx", "torchscript")]
    example = model.example_input() if graphs else None
    if graphs and example is None:
        raise ValueError(f"{type(model).__name__}: ONNX and TorchScript export need a tensor input; use safetensors")
    if "torchscript" in formats:
        model.to_torchscript(folder / "model.ts", method="trace", example_inputs=example)
        written["torchscript"] = folder / "model.ts"
    if "onnx" in formats:
        batch = torch.export.Dim("batch", min=1, max=4096)
        model.to_onnx(
            folder / "model.onnx",
            example,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"images": {0: batch}},
            dynamo=True,
            external_data=False,
        )
        written["onnx"] = folder / "model.onnx"
    if example is not None:
        for name, diff in check_parity(model, written, example).items():
            print(f"{name}: largest difference from the Lightning model {diff:.2e}")
            if diff > atol:
                raise RuntimeError(f"{name} export differs from the model by {diff:.2e} (> atol {atol})")
    if quantize:
        datamodule = build_datamodule(settings, **({"data_dir": data_dir} if data_dir else {}))
        meta["int8"] = export_int8(model, datamodule, folder / INT8_FILE, calibration_batches, max_drop, eval_batches)
        written["int8"] = folder / INT8_FILE
    meta["files"] = {k: v.name for k, v in written.items()}
    (folder / "config.json").write_text(json.dumps(meta, indent=1))
    written["config"] = folder / "config.json"
    return written


def export_int8(
    model, datamodule, path: Path, calibration_batches: int, max_drop: float, eval_batches: int | None
) -> dict:
    """Quantize ``model``, save it to ``path``, load it back and compare its test accuracy with the float model's;
    returns what ``config.json`` records under ``int8``. An accuracy drop above ``max_drop`` removes the file and
    raises."""
    datamodule.setup("fit")
    datamodule.setup("test")
    calibration = [model.split_batch(b)[0] for b in islice(datamodule.val_dataloader(), max(calibration_batches, 1))]
    save_int8(quantize_int8(model, calibration), path)
    int8 = load_int8(path)
    test = [model.split_batch(b) for b in islice(datamodule.test_dataloader(), eval_batches)]
    multi = bool(getattr(model, "multi_label", False))
    fp32_acc, samples = accuracy(model.eval(), test, multi)
    int8_acc, _ = accuracy(int8, test, multi)
    drop = fp32_acc - int8_acc
    fp32_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(
        f"int8: {path} ({path.stat().st_size / 1e6:.1f} MB; fp32 weights {fp32_bytes / 1e6:.1f} MB), test accuracy "
        f"{int8_acc:.4f} vs fp32 {fp32_acc:.4f} on {samples} samples"
    )
    if drop > max_drop:
        path.unlink()
        raise RuntimeError(
            f"int8 accuracy {int8_acc:.4f} is {drop:.4f} below fp32 {fp32_acc:.4f} on {samples} test samples "
            f"(> --max-drop {max_drop}); {path.name} not kept"
        )
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "fp32_weight_bytes": fp32_bytes,
        "method": "torchao int8 dynamic-activation linear" if int8.text else "PT2E static, X86 inductor quantizer",
        "calibration_batches": 0 if int8.text else max(calibration_batches, 1),
        "eval": {"split": "test", "batches": len(test), "samples": samples},
        "accuracy": {"fp32": fp32_acc, "int8": int8_acc, "drop": drop},
        "max_drop": max_drop,
        "load": "modules.quantize.load_int8(path)",
    }


@torch.no_grad()
def check_parity(model, written: dict[str, Path], example: torch.Tensor, batch: int = 3) -> dict[str, float]:
    """Largest absolute output difference between the model and each exported graph, on random inputs shaped like
    ``example`` (with a batch size other than the export's, to exercise the dynamic batch)."""
    shape = (batch, *example.shape[1:])
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=example.dtype)
    expected = model.eval()(images)
    diffs = {}
    if "torchscript" in written:
        diffs["torchscript"] = (torch.jit.load(str(written["torchscript"]))(images) - expected).abs().max().item()
    if "onnx" in written:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(written["onnx"]), providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"images": images.numpy()})
        diffs["onnx"] = (torch.from_numpy(logits) - expected).abs().max().item()
    return diffs


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="checkpoint file of a run (its config.yaml is found beside it)")
    parser.add_argument("--out", help="output folder (default: export/ in the run directory)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, help="default: all that apply to the model")
    parser.add_argument("--config", help="the run's config.yaml, when it is not beside the checkpoint")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed logit difference of an export")
    parser.add_argument("--quantize", choices=["int8"], help="also write model_int8.pt2 (int8 for CPU inference)")
    parser.add_argument("--calibration-batches", type=int, default=4, help="validation batches that calibrate int8")
    parser.add_argument("--max-drop", type=float, default=0.01, help="largest allowed int8 test accuracy drop")
    parser.add_argument("--eval-batches", type=int, help="test batches of the int8 accuracy check (default: all)")
    parser.add_argument("--data_dir", help="the run's data folder, when it has moved (for --quantize)")
    args = parser.parse_args(argv)
    formats = tuple(args.formats) if args.formats else None  # None: every format the task supports
    written = export(
        args.ckpt,
        args.out,
        formats,
        args.config,
        args.atol,
        args.quantize,
        args.calibration_batches,
        args.max_drop,
        args.eval_batches,
        args.data_dir,
    )
    for kind, path in written.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    from scripts.train import run_cli

    run_cli(main)
