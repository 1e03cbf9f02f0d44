"""The on-disk cache of tokenized splits shared by the text data modules (``text_classification``, ``squad``).

Under DDP, Lightning calls a data module's ``prepare_data`` on local rank 0 of each node (once per node), waits for
it on every rank, then calls ``setup`` on every rank. The modules tokenize in ``prepare_data`` and write each split
here; ``setup`` finds the entries (a cache hit on every rank) and tokenizes only what is missing (``setup`` called
without ``prepare_data``, as scripts and tests do).

* An entry's name is a digest of everything its tokens depend on (tokenizer, lengths, the texts), so a changed file,
  tokenizer or length is another entry, and identical inputs on two nodes give the same name.
* An entry is written whole to a temporary file of its own and then linked into place, never replaced: a process
  stopped mid-write leaves no broken entry, and two processes (two nodes on one shared folder) writing the same
  entry are harmless, the first one's file staying.
* Entries are memory-mapped when loaded: the ranks of one node share the pages of one file instead of holding a
  copy each.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch


def digest(parts: Iterable[str]) -> str:
    """A short hex digest of a sequence of strings (each one delimited, so ``["ab", "c"]`` and ``["a", "bc"]``
    differ)."""
    hashed = hashlib.sha256()
    for part in parts:
        hashed.update(part.encode() + b"\0")
    return hashed.hexdigest()[:24]


def tokenizer_identity(tokenizer) -> list[str]:
    """What a tokenizer's output depends on, as digest parts: its class, name or folder and vocabulary size."""
    return [type(tokenizer).__name__, tokenizer.name_or_path, str(len(tokenizer))]


def save_entry(payload: dict, path: Path) -> bool:
    """Write ``payload`` (tensors) to ``path`` unless it exists; True if this call wrote it.

    The file is written whole under a name of its own, then hard-linked into place, which fails rather than
    replaces when another process got there first (file systems without hard links: an atomic rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(payload, partial)
        try:
            os.link(partial, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network and FUSE file systems)
            os.replace(partial, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def load_entry(path: Path) -> dict:
    """A cached entry, memory-mapped (read-only use: the pages are shared by the processes that load it)."""
    return torch.load(path, weights_only=True, mmap=True)
