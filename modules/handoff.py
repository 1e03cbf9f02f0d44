"""The hand-off from pre-training to fine-tuning: a backbone exported alone, and loaded into any task module.

An exported backbone is a folder:

* ``backbone.safetensors``: the backbone's weights (no pickle), keys as in ``model.backbone.state_dict()``;
* ``backbone.json``: what a fine-tuning module needs to know about them: the module class that trained them, the
  backbone's name (registry name for images, encoder name for text), its layer groups, its width, and its input
  normalization (images) or tokenizer (text), the checkpoint it came from and the git commit.

Every task module takes it through one config key, ``model.backbone_checkpoint``: the folder, a ``.safetensors``
file, a Lightning checkpoint (its ``backbone.*`` keys), or a W&B artifact ``wandb:<entity>/<project>/<name>:<alias>``
(online). Loading checks the keys against the whole task module: the keys it leaves missing must be the new head's,
and anything else missing or unexpected, or a shape that differs, is an error that lists the keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from modules.compiling import strip_compile_prefix

WEIGHTS = "backbone.safetensors"
META = "backbone.json"


def _short(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"


def resolve(source: str | Path) -> Path:
    """The local path of ``source``; a ``wandb:`` artifact reference is downloaded first (needs internet)."""
    text = str(source)
    if text.startswith("wandb:"):
        import wandb

        reference = text.removeprefix("wandb:")
        try:
            artifact = wandb.Api().artifact(reference)
        except Exception as err:  # wandb raises several types for a missing key, project or artifact
            raise ValueError(f"cannot fetch W&B artifact {reference!r}: {err}") from None
        return Path(artifact.download())
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"backbone checkpoint {path} does not exist")
    return path


def read_backbone(source: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The backbone weights of ``source`` (keys without a ``backbone.`` prefix) and its metadata (empty if none).

    Files are read without unpickling code: safetensors, or ``torch.load(weights_only=True)``.
    """
    path = resolve(source)
    if path.is_dir():
        if not (path / WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} holds no {WEIGHTS}: not an exported backbone folder")
        path = path / WEIGHTS
    meta: dict = {}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
        if (path.parent / META).is_file():
            meta = json.loads((path.parent / META).read_text())
    else:
        # weights_only: a checkpoint is data, never code to unpickle.
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint
            hparams = state.get("hyper_parameters") or {}
            name = hparams.get("backbone") or hparams.get("encoder")
            meta = {"name": name} if isinstance(name, str) else {}
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    state = strip_compile_prefix(state)  # saved from a model wrapped by torch.compile(...)
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state, meta


def load_checked(target: nn.Module, state: dict[str, torch.Tensor], source, new_prefix: str | None = None) -> None:
    """Load ``state`` into ``target`` (not strict), then check the keys.

    Args:
        target: the module to load into.
        state: the weights, keys relative to ``target``.
        source: where they came from, for the error message.
        new_prefix: keys of ``target`` under this prefix (the new task head) may be missing; any other missing key
            is an error, as is any unexpected key.
    """
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ: torch lists them, one per line
        sizes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise ValueError(f"backbone checkpoint {source} does not fit: {'; '.join(sizes) or err}") from None
    missing = [k for k in result.missing_keys if not (new_prefix and k.startswith(new_prefix))]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"backbone checkpoint {source} does not fit this backbone: "
            f"missing keys {_short(missing)}, unexpected keys {_short(result.unexpected_keys)}"
        )


def load_backbone(model: nn.Module, source: str | Path, name: str | None = None) -> dict:
    """Load the backbone of ``source`` into ``model.backbone`` and return its metadata.

    Args:
        model: a task module with ``backbone`` and ``head`` (the head may not be built yet).
        source: see the module docstring.
        name: the model's backbone name; an export from a different backbone is an error that names both.
    """
    state, meta = read_backbone(source)
    if name and meta.get("name") and meta["name"] != name:
        raise ValueError(
            f"backbone checkpoint {source} holds a {meta['name']!r} backbone but the model is built with {name!r}: "
            f"set the model's backbone (or encoder) to {meta['name']!r}"
        )
    load_checked(model, {f"backbone.{k}": v for k, v in state.items()}, source, new_prefix="head.")
    return meta


def backbone_metadata(model: nn.Module) -> dict:
    """What ``backbone.json`` records about ``model``'s backbone."""
    hp = dict(getattr(model, "hparams", {}))
    meta = {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "name": hp.get("backbone") or hp.get("encoder"),
        "layer_groups": {g: list(p) for g, p in model.layer_groups.items()},
    }
    normalize = getattr(model, "normalize", None)
    if normalize is not None:  # images
        meta |= {
            "kind": "image",
            "num_features": model.num_features,
            "input_size": getattr(model, "input_size", None),
            "mean": normalize.mean.flatten().tolist(),
            "std": normalize.std.flatten().tolist(),
        }
    else:  # text
        meta |= {
            "kind": "text",
            "num_features": model.backbone.config.hidden_size,
            "tokenizer": str(getattr(model, "tokenizer_path", "")),
            "model_type": model.backbone.config.model_type,
        }
    return meta


def export_backbone(
    model: nn.Module,
    folder: str | Path,
    state: dict[str, torch.Tensor] | None = None,
    source: str | None = None,
    **extra,
) -> Path:
    """Write ``model``'s backbone to ``folder`` (``backbone.safetensors`` + ``backbone.json``); returns the folder.

    Args:
        model: the task module whose metadata (and, without ``state``, whose weights) are exported.
        folder: the output folder, created if needed.
        state: weights to export instead of the model's current ones (a checkpoint's ``state_dict``; only its
            ``backbone.*`` keys are kept).
        source: the checkpoint the weights come from, recorded in the metadata.
        extra: further metadata (the git commit, ...).
    """
    from safetensors.torch import save_file

    if state is None:
        weights = model.backbone.state_dict()
    else:
        state = strip_compile_prefix(state)
        weights = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    # clone: safetensors refuses tensors that share memory (tied embeddings), and views of larger tensors.
    weights = {k: v.detach().cpu().clone().contiguous() for k, v in weights.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / WEIGHTS), metadata={"format": "pt"})
    meta = backbone_metadata(model) | {"source": source, "tensors": len(weights)} | extra
    (folder / META).write_text(json.dumps(meta, indent=1) + "\n")
    return folder
