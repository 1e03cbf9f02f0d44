"""Export a checkpoint for serving; the model is rebuilt from the run's saved ``config.yaml``.

    python scripts/export.py CKPT [--out DIR] [--formats safetensors onnx torchscript]

* every model: ``model.safetensors`` (the weights) and ``config.json`` (model class, hyperparameters, class names,
  input size and normalization or tokenizer), loadable without Lightning;
* image classifiers also: ``model.onnx`` and ``model.ts`` (TorchScript), taking images in [0, 1] of shape
  (batch, 3, size, size) (normalization is inside) and returning logits, with a dynamic batch size.

Each exported graph is run once on random images and compared with the Lightning model; the largest difference is
printed, and one above ``--atol`` is an error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from scripts.from_run import load_run

FORMATS = ("safetensors", "onnx", "torchscript")


def export(
    ckpt: str, out: str | None = None, formats: tuple[str, ...] = FORMATS, config: str | None = None, atol: float = 1e-4
) -> dict[str, Path]:
    """Write the requested formats to ``out`` (default: ``export/`` in the run directory); returns their paths."""
    from safetensors.torch import save_file

    from modules.image_classifier import ImageClassifier

    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}; choose from {FORMATS}")
    model, settings, run_dir = load_run(ckpt, config)
    folder = Path(out) if out else run_dir / "export"
    folder.mkdir(parents=True, exist_ok=True)
    hparams = {k: v for k, v in dict(model.hparams).items() if _jsonable(v)}
    meta = {"model_class": settings["model"]["class_path"], "hparams": hparams, "checkpoint": str(ckpt)}
    written: dict[str, Path] = {}
    image_size = None
    if isinstance(model, ImageClassifier):
        image_size = settings["data"].get("init_args", {}).get("image_size") or model.input_size or 224
        meta |= {
            "input": {"shape": ["batch", 3, image_size, image_size], "range": [0, 1], "layout": "NCHW"},
            "output": "logits",
            "mean": model.normalize.mean.flatten().tolist(),
            "std": model.normalize.std.flatten().tolist(),
        }
    elif hasattr(model, "tokenizer_path"):
        meta["tokenizer"] = model.tokenizer_path
    if "safetensors" in formats:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"model_class": meta["model_class"]})
        written["safetensors"] = folder / "model.safetensors"
    graphs = [f for f in formats if f in ("onnx", "torchscript")]
    if graphs and image_size is None:
        raise ValueError(f"{type(model).__name__}: ONNX and TorchScript export is for image models; use safetensors")
    example = torch.rand(2, 3, image_size, image_size) if image_size else None
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
    meta["files"] = {k: v.name for k, v in written.items()}
    (folder / "config.json").write_text(json.dumps(meta, indent=1))
    written["config"] = folder / "config.json"
    if example is not None:
        for name, diff in check_parity(model, written, image_size).items():
            print(f"{name}: largest difference from the Lightning model {diff:.2e}")
            if diff > atol:
                raise RuntimeError(f"{name} export differs from the model by {diff:.2e} (> atol {atol})")
    return written


@torch.no_grad()
def check_parity(model, written: dict[str, Path], image_size: int, batch: int = 3) -> dict[str, float]:
    """Largest absolute logit difference between the model and each exported graph, on random images (a batch size
    other than the export's, to exercise the dynamic batch)."""
    images = torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
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
    args = parser.parse_args(argv)
    formats = tuple(args.formats) if args.formats else None
    if formats is None:
        from scripts.from_run import find_config, import_class

        config = Path(args.config) if args.config else find_config(Path(args.ckpt))
        import yaml

        model_class = import_class(yaml.safe_load(config.read_text())["model"]["class_path"])
        from modules.image_classifier import ImageClassifier

        formats = FORMATS if issubclass(model_class, ImageClassifier) else ("safetensors",)
    for kind, path in export(args.ckpt, args.out, formats, args.config, args.atol).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    from scripts.train import run_cli

    run_cli(main)
