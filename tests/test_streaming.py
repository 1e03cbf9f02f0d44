"""Streaming from tar shards (datamodules/streaming.py): shards round-trip, one epoch is split across ranks and loader
workers with every sample seen once and every rank yielding the same batches, corrupt members are skipped, bad
indexes are one-line errors, and a short fit runs through the data module."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning import Callback, Trainer
from torch.utils.data import DataLoader

from datamodules.image_folder import load_rgb, scan_class_folders
from datamodules.streaming import EpochLoader, ShardStream, StreamingImageDataModule, read_index, write_shards
from scripts.make_shards import main as make_shards


def fingerprint(image) -> str:
    """A decoded image's identity (module level: loader workers pickle it)."""
    return hashlib.md5(image.tobytes()).hexdigest()


def _members(folder: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture
def samples(image_folder: Path) -> list[tuple[Path, int]]:
    return scan_class_folders(image_folder)[0]  # 24 images, labels 0 (blue) and 1 (red)


def _shards(tmp_path: Path, samples, count: int, per_shard: int = 5) -> Path:
    out = tmp_path / f"shards_{count}"
    write_shards(samples[:count], out, per_shard, class_names=["blue", "red"])
    return out


def test_shards_round_trip_every_image_and_label(image_folder: Path, samples, tmp_path: Path) -> None:
    index = write_shards(image_folder, tmp_path / "shards", samples_per_shard=5)
    assert index["class_names"] == ["blue", "red"] and index["total"] == 24
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 5, 4]
    assert json.loads((tmp_path / "shards" / "index.json").read_text()) == index
    stored = _members(tmp_path / "shards")
    by_bytes = {path.read_bytes(): label for path, label in samples}
    assert len(stored) == 24 and sorted(by_bytes) == sorted(m["jpg"] for m in stored.values())  # the original bytes
    assert all(int(m["cls"]) == by_bytes[m["jpg"]] for m in stored.values())
    labels_in_order = [int(stored[k]["cls"]) for k in sorted(stored)]
    assert labels_in_order != sorted(labels_in_order)  # shuffled when written: a shard is not one class
    # read back through the stream: every image, decoded, with its label
    expected = Counter((fingerprint(load_rgb(p)), label) for p, label in samples)
    stream = ShardStream(read_index(tmp_path / "shards", count_members=True), fingerprint, rank=0, world_size=1)
    assert Counter(stream) == expected
    with pytest.raises(ValueError, match="already holds shards"):
        write_shards(image_folder, tmp_path / "shards")


def test_make_shards_cli_gives_another_split_the_training_labels(split_image_folder: Path, tmp_path, capsys) -> None:
    make_shards([str(split_image_folder / "train"), str(tmp_path / "train"), "--samples-per-shard", "10"])
    assert "wrote 24 samples of 3 classes in 3 shards" in capsys.readouterr().out
    (split_image_folder / "val" / "blue").rename(split_image_folder / "val_blue")  # val lacks a class
    make_shards([str(split_image_folder / "val"), str(tmp_path / "val"), "--classes-from", str(tmp_path / "train")])
    assert read_index(tmp_path / "val").class_names == ["blue", "green", "red"]
    assert {int(m["cls"]) for m in _members(tmp_path / "val").values()} == {1, 2}


def _epoch(folder: Path, rank: int, world: int, workers: int, batch_size: int = 5, **kwargs) -> list[tuple]:
    """The batches one rank's loader yields in one epoch: ``[(fingerprints, labels), ...]``."""
    stream = ShardStream(read_index(folder), fingerprint, batch_size, pad=True, rank=rank, world_size=world, **kwargs)
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers)
    batches = [(list(images), labels.tolist()) for images, labels in loader]
    assert len(loader) == len(batches)  # exact: Lightning's estimated_stepping_batches relies on it
    assert all(len(images) == batch_size for images, _ in batches[:-1])  # only the last batch may be partial
    return batches


@pytest.mark.parametrize("total", [24, 23])
def test_one_epoch_is_split_across_ranks_and_workers(samples, tmp_path: Path, total: int) -> None:
    folder = _shards(tmp_path, samples, total)
    everything = Counter(fingerprint(load_rgb(p)) for p, _ in samples[:total])
    for world in (1, 2, 3):
        for workers in (0, 1, 2):
            ranks = [_epoch(folder, rank, world, workers, shuffle=True, shuffle_buffer=3) for rank in range(world)]
            assert len({len(batches) for batches in ranks}) == 1, (world, workers)  # the same batches on every rank
            counts = [sum(len(images) for images, _ in batches) for batches in ranks]
            assert counts == [-(-total // world)] * world, (world, workers)  # and the same samples
            seen = Counter(f for batches in ranks for images, _ in batches for f in images)
            assert set(seen) == set(everything), (world, workers)  # every sample at least once
            repeats = sum(seen.values()) - total
            assert repeats == (0 if total % world == 0 else world - total % world), (world, workers)
            assert repeats <= world - 1


def test_evaluation_shares_are_exact(samples, tmp_path: Path) -> None:
    folder = _shards(tmp_path, samples, 23)
    for world in (2, 3):
        streams = [ShardStream(read_index(folder), fingerprint, 4, rank=r, world_size=world) for r in range(world)]
        seen = [f for s in streams for images, _ in DataLoader(s, batch_size=4, num_workers=2) for f in images]
        assert len(seen) == 23 and len(set(seen)) == 23  # every sample exactly once: no padding is counted
        assert sum(len(s) for s in streams) == 23


def test_the_order_is_a_function_of_seed_and_epoch(samples, tmp_path: Path) -> None:
    folder = _shards(tmp_path, samples, 24, per_shard=4)

    def order(epoch: int, seed: int = 0, workers: int = 2) -> list[str]:
        stream = ShardStream(read_index(folder), fingerprint, 4, True, 3, pad=True, seed=seed, rank=0, world_size=1)
        loader = EpochLoader(stream, lambda: epoch, batch_size=4, num_workers=workers)  # it sets the epoch
        return [f for images, _ in loader for f in images]

    first = order(0)
    assert order(0) == first and sorted(order(1)) == sorted(first)  # the same epoch twice: the same order
    assert order(1) != first and order(0, seed=1) != first
    in_process = order(0, workers=0)
    assert order(0, workers=0) == in_process != order(1, workers=0)


def test_a_rank_opens_only_the_shards_of_its_share(samples, tmp_path: Path, monkeypatch) -> None:
    folder = _shards(tmp_path, samples, 24, per_shard=4)  # 6 shards of 4
    opened = []
    real_open = tarfile.open

    def recording_open(name, *args, **kwargs):
        opened.append(Path(name).name)
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(tarfile, "open", recording_open)
    list(ShardStream(read_index(folder), fingerprint, rank=1, world_size=3))  # samples 8-15: shards 2 and 3
    assert opened == ["shard-000002.tar", "shard-000003.tar"]


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_members_are_skipped_with_a_warning_naming_them(samples, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    good = [path.read_bytes() for path, _ in samples[:3]]
    members = {"a.jpg": good[0], "a.cls": b"0", "b.jpg": b"\xff\xd8 not a jpeg", "b.cls": b"1", "c.jpg": good[1]}
    members |= {"d.jpg": good[2], "d.cls": b"one", "e.jpg": good[2], "e.cls": b"7", "f.jpg": good[1], "f.cls": b"1"}
    _tar(folder / "shard-000000.tar", members)
    (folder / "index.json").write_text(
        json.dumps({"class_names": ["x", "y"], "shards": [{"file": "shard-000000.tar", "samples": 7}], "total": 7})
    )
    index = read_index(folder)
    shard = folder / "shard-000000.tar"
    with pytest.warns(UserWarning) as record:
        kept = list(ShardStream(index, fingerprint, rank=0, world_size=1))  # evaluation: dropped
    messages = [str(w.message) for w in record]
    for key, why in [("b", "does not decode"), ("c", "no .cls"), ("d", "'one'"), ("e", "'7'"), ("#6", "no sample")]:
        assert any(f"sample {key} of shard {shard}" in m and why in m for m in messages), key
    assert [label for _, label in kept] == [0, 1]
    with pytest.warns(UserWarning, match="skipped sample"):
        padded = list(ShardStream(index, fingerprint, pad=True, rank=0, world_size=1))
    assert len(padded) == 7  # training: replaced by the previous good sample, so the rank keeps its length
    assert [label for _, label in padded] == [0, 0, 0, 0, 0, 1, 1]


def test_a_bad_index_is_a_one_line_error_naming_the_file(samples, tmp_path: Path) -> None:
    folder = _shards(tmp_path, samples, 12)
    path = folder / "index.json"
    original = json.loads(path.read_text())

    def error(index) -> str:
        path.write_text(index if isinstance(index, str) else json.dumps(index))
        with pytest.raises(ValueError) as info:
            read_index(folder, count_members=True)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert str(path) in error("{not json")
    assert str(path) in error({**original, "total": 13}) and "13" in error({**original, "total": 13})
    assert str(path) in error({"shards": original["shards"], "total": 12})
    missing = [*original["shards"], {"file": "shard-000009.tar", "samples": 2}]
    assert str(folder / "shard-000009.tar") in error({**original, "shards": missing, "total": 14})
    wrong = [{**original["shards"][0], "samples": 4}, *original["shards"][1:]]
    assert "holds 5 samples" in error({**original, "shards": wrong, "total": 11})
    path.unlink()
    with pytest.raises(ValueError, match="index.json does not exist"):
        _ = StreamingImageDataModule(str(folder), str(folder)).class_names


def test_a_short_fit_through_the_data_module(split_image_folder: Path, tmp_path: Path) -> None:
    from modules.image_classifier import ImageClassifier

    write_shards(split_image_folder / "train", tmp_path / "train", samples_per_shard=7)
    write_shards(split_image_folder / "val", tmp_path / "val", samples_per_shard=7)
    dm = StreamingImageDataModule(
        str(tmp_path / "train"), str(tmp_path / "val"), image_size=32, batch_size=4, num_workers=0, shuffle_buffer=4
    )
    assert dm.class_names == ["blue", "green", "red"] and dm.num_classes == 3 and dm.test_is_val  # before setup
    model = ImageClassifier("efficientnet_lite_tiny", pretrained=False, num_classes=dm.num_classes)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == 2 and len(trainer.train_dataloader) == 6  # 24 images, batches of 4
    assert trainer.train_dataloader.dataset.epoch == 1  # the loader followed the trainer's epoch
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert "test/acc" in trainer.test(model, datamodule=dm, verbose=False)[0]


class RecordBatches(Callback):
    """Each rank's training and validation samples (fingerprints of the images it was fed), saved at the end."""

    def __init__(self, folder: Path):
        self.folder, self.seen = folder, {"train": [], "val": []}

    def _record(self, stage: str, batch) -> None:
        self.seen[stage].append([hashlib.md5(image.numpy().tobytes()).hexdigest() for image in batch[0]])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record("train", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record("val", batch)

    def on_fit_end(self, trainer, pl_module):
        torch.save(self.seen, self.folder / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_processes_same_batches_every_sample_once(samples, tmp_path: Path, monkeypatch) -> None:
    """Real DDP (2 gloo processes): the ranks read their shares from torch.distributed; 23 training samples give
    both ranks 3 batches of 4 (one sample repeated), 9 validation samples are each evaluated once (4 + 5 samples:
    1 and 2 batches, which must not hang)."""
    from lightning.pytorch.strategies import DDPStrategy

    # An earlier DDP test in this process leaves its MASTER_PORT behind, possibly still bound: Lightning picks a free
    # port when none is set.
    monkeypatch.delenv("MASTER_PORT", raising=False)

    from modules.image_classifier import ImageClassifier

    write_shards(samples[:23], tmp_path / "train", 5, class_names=["blue", "red"])
    write_shards(samples[:9], tmp_path / "val", 5, class_names=["blue", "red"])
    dm = StreamingImageDataModule(
        str(tmp_path / "train"), str(tmp_path / "val"), image_size=32, batch_size=4, augment="none", num_workers=0
    )
    model = ImageClassifier("efficientnet_lite_tiny", pretrained=False, num_classes=2)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="spawn", process_group_backend="gloo"),
        max_epochs=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordBatches(tmp_path)],
    )
    trainer.fit(model, datamodule=dm)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [[len(b) for b in seen["train"]] for seen in ranks] == [[4, 4, 4]] * 2
    train = [f for seen in ranks for batch in seen["train"] for f in batch]
    assert len(train) == 24 and len(set(train)) == 23
    assert [[len(b) for b in seen["val"]] for seen in ranks] == [[4], [4, 1]]
    val = [f for seen in ranks for batch in seen["val"] for f in batch]
    assert len(val) == 9 and len(set(val)) == 9
