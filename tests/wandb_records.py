"""Read what an offline W&B run recorded: its ``run-<id>.wandb`` file is a LevelDB-style log of protobuf records
(wandb 0.31 ships no reader for it, and offline runs write no ``config.yaml`` or summary file)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, LAST = 1, 4


def records(path: Path) -> Iterator[pb.Record]:
    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a record header never straddles blocks: the rest of the block is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_run(run_dir: Path) -> dict:
    """``{"config": {key: value}, "history_keys": set, "files": [paths]}`` of an offline run folder."""
    (log,) = run_dir.glob("run-*.wandb")
    config, history, files = {}, set(), []
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config |= {item.key: json.loads(item.value_json) for item in record.config.update}
        elif kind == "history":
            history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "files":
            files += [f.path for f in record.files.files]
    return {"config": config, "history_keys": history, "files": files}
