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
import importlib
import json
from pathlib import Path

import torch

from scripts.from_run import load_run

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
) -> dict[str, Path]:
    """Write the requested formats to ``out`` (default: ``export/`` in the run directory; None: every format the
    task supports: the graphs where it has a tensor input); returns their paths."""
    from safetensors.torch import save_file

    unknown = set(formats or ()) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}; choose from {FORMATS}")
    model, settings, run_dir = load_run(ckpt, config)
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
    meta["files"] = {k: v.name for k, v in written.items()}
    (folder / "config.json").write_text(json.dumps(meta, indent=1))
    written["config"] = folder / "config.json"
    if example is not None:
        for name, diff in check_parity(model, written, example).items():
            print(f"{name}: largest difference from the Lightning model {diff:.2e}")
            if diff > atol:
                raise RuntimeError(f"{name} export differs from the model by {diff:.2e} (> atol {atol})")
    return written


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
    args = parser.parse_args(argv)
    formats = tuple(args.formats) if args.formats else None  # None: every format the task supports
    for kind, path in export(args.ckpt, args.out, formats, args.config, args.atol).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    from scripts.train import run_cli

    run_cli(main)
