"""Write an image folder as WebDataset-style tar shards for ``datamodules.streaming.StreamingImageDataModule``.

    python scripts/make_shards.py ../shared/data/hymenoptera/train runs/shards/train --samples-per-shard 64
    python scripts/make_shards.py ../shared/data/hymenoptera/val runs/shards/val --samples-per-shard 64 \\
        --classes-from runs/shards/train

One split per call: ``SOURCE/<class>/<images>``. The samples are shuffled (seeded) before they are cut into shards, so
that every shard is a random draw of the data set; ``--classes-from`` gives another split the training labels.
"""

from __future__ import annotations

import argparse

from datamodules.streaming import read_index, write_shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="folder of class folders (one split)")
    parser.add_argument("out_dir", help="shard folder to write (shard-000000.tar, ..., index.json)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar file (default 1000)")
    parser.add_argument("--classes-from", help="shard folder whose class names (label order) to use: the training one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the folder order (class by class)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards already in OUT_DIR")
    args = parser.parse_args(argv)
    names = read_index(args.classes_from).class_names if args.classes_from else None
    index = write_shards(
        args.source,
        args.out_dir,
        args.samples_per_shard,
        class_names=names,
        shuffle=not args.no_shuffle,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {index['total']} samples of {len(index['class_names'])} classes in {len(index['shards'])} shards "
        f"to {args.out_dir}"
    )


if __name__ == "__main__":
    from scripts.train import run_cli

    run_cli(main)
