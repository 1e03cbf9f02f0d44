"""Export the backbone of any checkpoint for fine-tuning: ``backbone.safetensors`` + ``backbone.json``.

    python scripts/export_backbone.py CKPT [--out DIR]

The model is rebuilt from the run's saved ``config.yaml`` (found beside the checkpoint, or ``--config``); the output
folder (default: ``backbone/`` in the run directory) is what ``--model.backbone_checkpoint`` takes.
"""

from __future__ import annotations

import argparse

from callbacks.tracking import git_commit
from modules.handoff import export_backbone
from scripts.from_run import load_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="checkpoint file of a run (its config.yaml is found beside it)")
    parser.add_argument("--out", help="output folder (default: backbone/ in the run directory)")
    parser.add_argument("--config", help="the run's config.yaml, when it is not beside the checkpoint")
    args = parser.parse_args(argv)
    model, _, run_dir = load_run(args.ckpt, args.config)
    folder = export_backbone(model, args.out or run_dir / "backbone", source=args.ckpt, git_commit=git_commit())
    print(f"backbone exported to {folder} (fine-tune with --model.backbone_checkpoint {folder})")


if __name__ == "__main__":
    from scripts.train import run_cli

    run_cli(main)
