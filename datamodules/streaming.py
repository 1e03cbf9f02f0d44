"""Images streamed from WebDataset-style tar shards: data sets that fit neither a disk nor memory.

A shard folder holds ``shard-000000.tar``, ``shard-000001.tar``, ... and ``index.json``. Each tar holds, per sample,
``<key>.<ext>`` (the original image file's bytes: ``jpg``, ``png``, ...) and ``<key>.cls`` (the class index as text),
the members of a sample next to each other, as WebDataset writes them; ``index.json`` lists the class names, every
shard's file name and sample count, and the total. :func:`write_shards` (``scripts/make_shards.py``) writes them from
an image folder, shuffled, so that a shard is a random draw of the data set rather than one class.

One training epoch, as every rank and loader worker sees it:

1. The epoch's sample sequence: the shards in an order drawn from ``(seed, epoch)`` (the run's seed, as
   ``datamodules.loaders`` draws every other random stream), the samples of a shard in their stored order.
2. Rank ``r`` of ``W`` takes the contiguous share ``[r * M, (r + 1) * M)`` with ``M = ceil(N / W)``; the sequence is
   padded to ``M * W`` by repeating its first samples, as torch's ``DistributedSampler`` does, so every rank yields
   the same number of samples and batches (a rank with one batch fewer leaves the others waiting in DDP's gradient
   all-reduce for ever). When ``N % W == 0`` nothing repeats. A rank opens only the shards its share overlaps (which
   is why the shares are contiguous, not strided as ``datamodules.loaders.EpochSampler``'s: a step's samples here
   depend on the device count). Rank and world size come from ``torch.distributed`` when the stream is built, in the
   main process (Lightning builds loaders once the process group is up).
3. Within a rank, the share is cut into batches, and each loader worker takes a contiguous run of whole batches:
   no worker yields a partial batch but the one holding the share's end, so the loader yields exactly
   ``ceil(M / batch_size)`` batches, which is ``len(loader)`` (Lightning's LR schedules count on it).
4. Optionally a shuffle buffer (per worker, seeded by ``(seed, epoch, rank, worker)``) mixes samples of nearby shards.

Validation and testing take exact shares instead (``pad=False``): rank ``r`` gets ``[r * N // W, (r + 1) * N // W)``
in the stored order, so every sample is evaluated exactly once and no duplicate is counted. Ranks may then differ by
a batch, which is safe under DDP: evaluation has no per-step collective (the metrics are torchmetrics objects,
synchronised once at the epoch's end). Under FSDP every forward pass is a collective (it gathers the parameters), so
there evaluation shares are padded like training's (a few samples counted twice, as Lightning's own
``DistributedSampler`` does for evaluation).

Why our own sharding rather than the ``webdataset`` package's: its node and worker splitting hands whole shards to
ranks, so ranks get unequal sample counts unless the shards divide evenly, and DDP hangs on the rank with a batch more
unless samples are resampled (``with_epoch``, which no longer shows each sample exactly once per epoch). We want both:
equal counts on every rank and each sample once per epoch.

The epoch reaches the dataset through :class:`EpochLoader`: Lightning's ``set_epoch`` reaches only a loader's sampler,
and a loader of an ``IterableDataset`` has none; the dataset is copied into the worker processes when an epoch's
iterator is made. So the loader asks the trainer for its epoch (``current_epoch``) each time an iterator is made, sets
it on the dataset in the main process, then starts the workers (never persistent in training, so each epoch's copy
carries its own epoch). A resumed run thus replays the same order.

A corrupt sample (an image that does not decode, a missing or non-integer ``.cls``, a label out of range, a member
missing from a shard) is skipped with a warning that names the shard and the key, never a crash. In training, the
worker yields its previous good sample in its place, so the rank still yields the count ``len()`` reported; in
evaluation it is dropped. A missing shard file, or an ``index.json`` that is unreadable or does not match the shards,
is a one-line ``ValueError`` naming the file, at set-up (each shard's sample count is compared only with
``verify_shards``, which reads every tar header; without it, a shard shorter than its entry shows as skipped samples).
"""

from __future__ import annotations

import bisect
import io
import json
import math
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from lightning import LightningDataModule
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.image_folder import IMAGE_EXTENSIONS, Sample, load_rgb, scan_class_folders
from datamodules.loaders import _seed_worker, current_epoch, derive_seed, make_loader, run_seed
from datamodules.transforms import Augment, eval_transform, train_transform

INDEX = "index.json"
IMAGE_EXTS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


def write_shards(
    source: str | Path | Sequence[Sample],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    class_names: list[str] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write images as WebDataset-style tar shards plus ``index.json``; return the index.

    Args:
        source: a folder of class folders (``<source>/<class>/<images>``, one split), or ``(path, label)`` samples.
        out_dir: the shard folder to write (created; it must hold no shards unless ``overwrite``).
        samples_per_shard: samples per tar file (the last one holds the rest).
        class_names: the label order. From a folder: None takes its class folders, sorted; give the training
            split's names when writing another split, so that labels agree. Required with samples.
        shuffle: write the samples in a seeded random order (a shard is then a random draw, not one class).
        seed: seed of that order.
        overwrite: replace the shards and index already in ``out_dir``.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if isinstance(source, str | Path):
        root = Path(source).expanduser()
        if (root / "train").is_dir():
            raise ValueError(f"{root} holds a train/ folder: write each split's shards, e.g. from {root / 'train'}")
        samples, class_names = scan_class_folders(root, class_names)
    elif class_names is None:
        raise ValueError("write_shards from a list of samples needs class_names")
    else:
        samples = [(Path(path), int(label)) for path, label in source]
    if not samples:
        raise ValueError("no samples to write")
    if len(class_names) < 2:
        raise ValueError(f"a classifier needs at least two classes, got {list(class_names)}")
    if shuffle:
        samples = list(samples)
        random.Random(seed).shuffle(samples)

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    old = [out / INDEX, *out.glob("shard-*.tar")]
    if any(p.exists() for p in old):
        if not overwrite:
            raise ValueError(f"{out} already holds shards: choose another folder, or overwrite them (--overwrite)")
        for path in old:
            path.unlink(missing_ok=True)

    shards = []
    for number, start in enumerate(range(0, len(samples), samples_per_shard)):
        name = f"shard-{number:06d}.tar"
        chunk = samples[start : start + samples_per_shard]
        with tarfile.open(out / name, "w") as tar:
            for i, (path, label) in enumerate(chunk, start):
                key = f"{i:09d}"  # no dot: WebDataset splits a member's name at the first dot of its base name
                ext = path.suffix.lower().lstrip(".")
                _add_member(tar, f"{key}.{ext}", path.read_bytes())
                _add_member(tar, f"{key}.cls", str(label).encode())
        shards.append({"file": name, "samples": len(chunk)})
    index = {"class_names": list(class_names), "shards": shards, "total": len(samples)}
    (out / INDEX).write_text(json.dumps(index, indent=1) + "\n")  # last: a folder with an index is complete
    return index


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: the same images give the same shards
    tar.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class ShardIndex:
    """A shard folder's ``index.json``, checked: class names, shard files (full paths) and their sample counts."""

    folder: Path
    class_names: list[str]
    files: list[Path]
    counts: list[int]

    @property
    def total(self) -> int:
        return sum(self.counts)


def read_index(folder: str | Path, count_members: bool = False) -> ShardIndex:
    """Read and check ``<folder>/index.json``; every problem is a one-line ``ValueError`` naming the file.

    Args:
        folder: the shard folder.
        count_members: also count each shard's samples (every tar header is read once: quick on a local disk, slow on
            a network one) and compare them with the index.
    """
    path = Path(folder).expanduser() / INDEX
    if not path.is_file():
        raise ValueError(f"{path} does not exist: write shards with scripts/make_shards.py")
    try:
        index = json.loads(path.read_text())
        names = index["class_names"]
        files = [path.parent / shard["file"] for shard in index["shards"]]
        counts = [shard["samples"] for shard in index["shards"]]
        total = index["total"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a shard index ({type(err).__name__}: {err})") from None
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: class_names must list at least two class names, got {names!r}")
    if not files or not all(isinstance(c, int) and c > 0 for c in counts):
        raise ValueError(f"{path}: every shard must hold at least one sample, got counts {counts}")
    if total != sum(counts):
        raise ValueError(f"{path}: total is {total} but its shards hold {sum(counts)} samples")
    for file, count in zip(files, counts, strict=True):
        if not file.is_file():
            raise ValueError(f"shard {file} listed in {path} does not exist")
        if count_members and (found := _count_samples(file)) != count:
            raise ValueError(f"shard {file} holds {found} samples but {path} lists {count}")
    return ShardIndex(path.parent, names, files, counts)


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's ``(key, extension)`` of a member: the name up to the first dot of its base name."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (name, "")


def _count_samples(file: Path) -> int:
    try:
        with tarfile.open(file, "r:") as tar:
            keys = [_split_name(m.name)[0] for m in tar if m.isfile()]
    except (OSError, tarfile.TarError) as err:
        raise ValueError(f"shard {file} is not a readable tar file ({err})") from None
    return sum(1 for i, key in enumerate(keys) if i == 0 or key != keys[i - 1])


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return rank or 0, world_size or 1


class ShardStream(IterableDataset):
    """``(image, label)`` samples of a shard folder, one epoch per iteration, split across ranks and loader workers
    as the module docstring describes.

    Args:
        index: the shard folder's index (:func:`read_index`).
        transform: applied to each decoded RGB PIL image.
        batch_size: the loader's batch size: workers take whole batches, so only the last batch is partial.
        shuffle: draw the shard order from ``(seed, epoch)`` (training); False keeps the stored order.
        shuffle_buffer: with ``shuffle``, mix samples in a buffer of this many (raw, still encoded) samples per worker.
        pad: every rank yields ``ceil(N / world_size)`` samples, repeating samples from the start of the sequence,
            and a corrupt sample is replaced by the previous good one (training); False: exact shares (evaluation).
        seed: the run's seed (None: ``seed_everything``'s).
        rank: this process's rank (None: from ``torch.distributed`` when it is initialised, else 0).
        world_size: the number of ranks (None: from ``torch.distributed``, else 1).
    """

    def __init__(
        self,
        index: ShardIndex,
        transform: Callable | None = None,
        batch_size: int = 1,
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        pad: bool = False,
        seed: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.index, self.transform, self.batch_size = index, transform, batch_size
        self.shuffle, self.shuffle_buffer, self.pad = shuffle, shuffle_buffer, pad
        # Resolved here, in the main process: a worker started by spawn has no process group and no seed to read.
        self.seed = run_seed() if seed is None else seed
        self.rank, self.world_size = _world(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _share(self) -> tuple[int, int]:
        """This rank's ``[begin, end)`` in the epoch's sequence (positions past ``N`` wrap around: padding)."""
        n, r, w = self.index.total, self.rank, self.world_size
        if self.pad:
            per_rank = math.ceil(n / w)
            return r * per_rank, (r + 1) * per_rank
        return r * n // w, (r + 1) * n // w

    def __len__(self) -> int:
        begin, end = self._share()
        return end - begin

    def _worker_span(self, worker: int, num_workers: int) -> tuple[int, int]:
        """The worker's ``[begin, end)``: a contiguous run of whole batches of the rank's share."""
        begin, end = self._share()
        batches = math.ceil((end - begin) / self.batch_size)
        first, last = worker * batches // num_workers, (worker + 1) * batches // num_workers
        return begin + first * self.batch_size, min(begin + last * self.batch_size, end)

    def _shard_order(self) -> list[int]:
        order = list(range(len(self.index.files)))
        if self.shuffle:  # the same on every rank: it depends only on (seed, epoch)
            random.Random(derive_seed(self.seed, self.epoch, 0)).shuffle(order)
        return order

    def _pieces(self, begin: int, end: int) -> Iterator[tuple[int, int, int]]:
        """``(shard, first, stop)``: the runs of shard samples that make up positions ``[begin, end)``."""
        order, counts = self._shard_order(), self.index.counts
        starts = [0]
        for shard in order:
            starts.append(starts[-1] + counts[shard])
        total, pos = starts[-1], begin
        while pos < end:
            within = pos % total  # padding wraps around to the start of the sequence
            k = bisect.bisect_right(starts, within) - 1
            first = within - starts[k]
            take = min(counts[order[k]] - first, end - pos)
            yield order[k], first, first + take
            pos += take

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        records: Iterator = (
            record
            for shard, first, stop in self._pieces(*self._worker_span(worker, num_workers))
            for record in _read(self.index.files[shard], first, stop)
        )
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(self.seed, self.epoch, 3, self.rank, worker))
            records = _buffer_shuffle(records, self.shuffle_buffer, rng)
        samples = (_decode(record, len(self.index.class_names)) for record in records)
        samples = _substitute(samples) if self.pad else (s for s in samples if s is not None)
        for image, label in samples:
            yield (self.transform(image) if self.transform else image), label


Record = tuple[Path, str, dict[str, bytes] | None]  # (shard, key, {extension: bytes}); None: the member is missing


def _read(path: Path, first: int, stop: int) -> Iterator[Record]:
    """Samples ``first`` to ``stop - 1`` of a shard, as raw members (skipped samples' data is never read)."""
    done = first
    try:
        with tarfile.open(path, "r:") as tar:
            number, key, files = -1, None, {}
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_name(member.name)
                if member_key != key:  # a new sample starts
                    if number >= first and key is not None:
                        yield path, key, files
                        done = number + 1
                    number, key, files = number + 1, member_key, {}
                    if number >= stop:
                        return
                if number >= first:
                    files[ext] = tar.extractfile(member).read()
            if key is not None and first <= number < stop:
                yield path, key, files
                done = number + 1
    except (OSError, tarfile.TarError) as err:
        warnings.warn(f"shard {path} is unreadable from sample {done} on ({err})", stacklevel=2)
    for missing in range(done, stop):  # the shard ended early, or broke
        yield path, f"#{missing}", None


def _decode(record: Record, num_classes: int):
    """``(RGB image, label)``, or None (with a warning naming the shard and key) when the sample is corrupt."""
    path, key, files = record
    problem = None
    if files is None:
        problem = f"the shard has no sample {key} (index.json lists more)"
    elif (ext := next((e for e in files if e in IMAGE_EXTS), None)) is None:
        problem = f"no image member (found {sorted(files)})"
    elif "cls" not in files:
        problem = "no .cls member"
    else:
        text = files["cls"].decode(errors="replace").strip()
        if not re.fullmatch(r"\d+", text) or int(text) >= num_classes:
            problem = f"label {text!r} is not a class index 0-{num_classes - 1}"
        else:
            try:
                return load_rgb(io.BytesIO(files[ext])), int(text)  # PIL opens a file object as a path
            except Exception as err:  # PIL raises several unrelated types for bad files
                problem = f"the image does not decode ({type(err).__name__}: {err})"
    warnings.warn(f"skipped sample {key} of shard {path}: {problem}", stacklevel=2)
    return None


def _substitute(samples: Iterator) -> Iterator:
    """The samples with each None (a skipped one) replaced by the previous good sample, or by the first good one for
    those before it: the stream keeps its length, so every rank keeps its batch count."""
    last, owed = None, 0
    for sample in samples:
        if sample is None:
            if last is None:
                owed += 1
            else:
                yield last
            continue
        last = sample
        for _ in range(owed + 1):
            yield sample
        owed = 0


def _buffer_shuffle(records: Iterator, size: int, rng: random.Random) -> Iterator:
    """WebDataset's shuffle: fill a buffer of ``size``, then yield a random element of it for each new one."""
    buffer = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = record
    rng.shuffle(buffer)
    yield from buffer


class EpochLoader(DataLoader):
    """A DataLoader of a :class:`ShardStream` that sets the dataset's epoch, and reseeds its workers' base seed, from
    ``epoch()`` each time an epoch's iterator is made (see the module docstring). Its workers are not persistent."""

    def __init__(self, dataset: ShardStream, epoch: Callable[[], int], batch_size: int, num_workers: int, **kwargs):
        self.epoch_of, self.seed_generator = epoch, torch.Generator()
        super().__init__(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            worker_init_fn=_seed_worker if num_workers > 0 else None,
            generator=self.seed_generator,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def __iter__(self):
        epoch = self.epoch_of()
        self.dataset.set_epoch(epoch)
        self.seed_generator.manual_seed(derive_seed(self.dataset.seed, epoch, 1))
        return super().__iter__()


class StreamingImageDataModule(LightningDataModule):
    """Images in WebDataset-style tar shards (``scripts/make_shards.py`` writes them), streamed: no split is ever
    held in memory or copied, and each rank reads only the shards of its share. Same transforms as
    :class:`~datamodules.image_folder.ImageFolderDataModule`.

    Args:
        train_shards: folder of the training shards and their ``index.json``.
        val_shards: folder of the validation shards (the same class names).
        test_shards: folder of the test shards; None tests on the validation shards (``test_is_val``; ``fit`` then
            tests its last weights rather than the checkpoint chosen on them).
        image_size: side length of the images fed to the model.
        batch_size: batch size of every loader.
        augment: training augmentation preset (``none``, ``basic``, ``randaugment``).
        hflip: random horizontal flips in training.
        rotation: maximum rotation in degrees in training.
        crop_scale: area range of the training random resized crop.
        num_workers: data-loader worker processes (tar reading and image decoding run there).
        shuffle_buffer: training samples mixed in memory per worker, on top of the per-epoch shard order (0: none).
            It holds encoded images: 1,000 photos of 100 kB take 100 MB per worker.
        verify_shards: at set-up, count every shard's samples and compare with ``index.json`` (reads every tar
            header once).
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str,
        test_shards: str | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        augment: Augment = "basic",
        hflip: bool = True,
        rotation: float = 10.0,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        verify_shards: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self._class_names: list[str] | None = None
        self.test_is_val = test_shards is None  # scripts/train.py reads it

    @property
    def class_names(self) -> list[str]:
        """The training index's class names: known before ``setup`` (the model is built with them)."""
        if self._class_names is None:
            self._class_names = read_index(self.hparams.train_shards).class_names
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "indexes"):
            return
        # Lightning warns about every IterableDataset with a __len__, since a naively split one yields duplicates
        # across workers; ShardStream splits by worker itself and its length is exact.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        hp = self.hparams
        folders = {"train": hp.train_shards, "val": hp.val_shards, "test": hp.test_shards or hp.val_shards}
        self.indexes = {split: read_index(folder, hp.verify_shards) for split, folder in folders.items()}
        for index in self.indexes.values():
            if index.class_names != self.class_names:
                raise ValueError(
                    f"{index.folder / INDEX} lists classes {index.class_names}, the training shards "
                    f"{self.class_names}: write it with scripts/make_shards.py --classes-from {hp.train_shards}"
                )

    def image_transform(self):
        """The evaluation pipeline for an image file (``scripts/predict.py``)."""
        return eval_transform(self.hparams.image_size)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        augment = train_transform(hp.image_size, hp.augment, hp.hflip, hp.rotation, tuple(hp.crop_scale))
        stream = ShardStream(
            self.indexes["train"], augment, hp.batch_size, shuffle=True, shuffle_buffer=hp.shuffle_buffer, pad=True
        )
        return EpochLoader(stream, lambda: current_epoch(self.trainer), hp.batch_size, hp.num_workers)

    def _eval_loader(self, split: str) -> DataLoader:
        hp = self.hparams
        # FSDP's forward pass is a collective: every rank must run as many batches (see the module docstring).
        strategy = getattr(getattr(self, "trainer", None), "strategy", None)
        sharded = isinstance(strategy, FSDPStrategy | ModelParallelStrategy)
        stream = ShardStream(self.indexes[split], eval_transform(hp.image_size), hp.batch_size, pad=sharded)
        return make_loader(stream, hp.batch_size, hp.num_workers)  # no randomness: workers may persist

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
