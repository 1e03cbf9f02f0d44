"""Does pre-training help? Fine-tune one experiment from a pre-trained backbone and from scratch, with the same
budget (config, epochs, data split), over several seeds, and write a table of the test metric (mean and spread).

    python scripts/compare.py --config configs/finetune_image.yaml --backbone runs/pretrain_image/version_0/backbone \
        [--seeds 0 1 2] [--arms pretrained scratch] [--out runs/compare_image] [-- extra LightningCLI arguments]

Arms: ``pretrained`` (``model.backbone_checkpoint`` = the backbone), ``scratch`` (the same architecture with random
weights), ``base`` (the architecture's own pretrained weights, e.g. MiniLM's, when they are available offline).
Each run is an ordinary run of the experiment (CSV metrics under ``--out``, W&B group ``compare_<name>``); the
table goes to ``<out>/results.md`` and ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml

from scripts.train import main as train

ARMS = {
    "pretrained": lambda backbone: ["--model.backbone_checkpoint", backbone, "--model.pretrained", "false"],
    "scratch": lambda backbone: ["--model.backbone_checkpoint", "null", "--model.pretrained", "false"],
    "base": lambda backbone: ["--model.backbone_checkpoint", "null", "--model.pretrained", "true"],
}


def loggers(out: Path, name: str, arm: str, seed: int) -> dict:
    """The trainer's loggers for one run: CSV under ``out/<arm>/seed<seed>``, W&B grouped by comparison."""
    return {
        "trainer": {
            "logger": [
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(out), "name": arm, "version": f"seed{seed}"},
                },
                {
                    "class_path": "callbacks.tracking.WandbLogger",
                    "init_args": {
                        "project": "finetune-template",
                        "name": f"{name}-{arm}-seed{seed}",
                        "group": f"compare_{name}",
                        "tags": ["compare", arm],
                        "log_model": False,
                    },
                },
            ]
        }
    }


def summarize(runs: list[dict], metric: str) -> list[dict]:
    """One row per arm: mean, sample standard deviation, min and max of ``metric`` over its seeds."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        values = [r["test"][metric] for r in runs if r["arm"] == arm]
        rows.append(
            {
                "arm": arm,
                "seeds": len(values),
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
                "values": values,
                "wall_s": statistics.fmean(r["wall_s"] for r in runs if r["arm"] == arm),
            }
        )
    return rows


def table(rows: list[dict], metric: str) -> str:
    lines = [
        f"| arm | {metric} mean | std | min | max | seeds | fit s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['mean']:.4f} | {r['std']:.4f} | {r['min']:.4f} | {r['max']:.4f} | {r['seeds']} "
            f"| {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def compare(
    config: str,
    backbone: str | None,
    seeds: list[int],
    arms: list[str],
    out: Path,
    metric: str = "test/acc",
    extra: list[str] | None = None,
) -> list[dict]:
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS)}")
    if "pretrained" in arms and not backbone:
        raise ValueError("the pretrained arm needs --backbone (an exported backbone folder or a checkpoint)")
    out.mkdir(parents=True, exist_ok=True)
    name = Path(config).stem
    runs = []
    for seed in seeds:
        for arm in arms:
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                yaml.safe_dump(loggers(out, name, arm, seed), f)
            args = ["fit", "--config", config, "--config", f.name, "--seed_everything", str(seed)]
            cli = train([*args, *ARMS[arm](backbone), *(extra or [])])
            Path(f.name).unlink()
            if metric not in cli.results["test"]:
                raise KeyError(f"{config} reports no {metric!r} at test; it reports {sorted(cli.results['test'])}")
            runs.append({"arm": arm, "seed": seed, **cli.results})
            print(f"[compare] {arm} seed {seed}: {metric} {cli.results['test'][metric]:.4f}", flush=True)
    rows = summarize(runs, metric)
    header = f"# {name}: pre-trained backbone vs from scratch\n\nbackbone: `{backbone}`; seeds {seeds}; "
    header += f"extra arguments: `{' '.join(extra or []) or 'none'}`\n\n"
    (out / "results.md").write_text(header + table(rows, metric) + "\n")
    (out / "results.json").write_text(
        json.dumps({"config": config, "backbone": backbone, "metric": metric, "arms": rows, "runs": runs}, indent=1)
    )
    print("\n" + table(rows, metric) + f"\n\nwritten to {out / 'results.md'}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the fine-tuning experiment (configs/finetune_image.yaml)")
    parser.add_argument("--backbone", help="exported backbone folder, safetensors file or checkpoint")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=["pretrained", "scratch"], choices=list(ARMS))
    parser.add_argument("--metric", default="test/acc", help="the test metric to compare")
    parser.add_argument("--out", default=None, help="output folder (default: runs/compare_<config name>)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    out = Path(args.out or f"runs/compare_{Path(args.config).stem}")
    compare(args.config, args.backbone, args.seeds, args.arms, out, args.metric, extra)


if __name__ == "__main__":
    main()
