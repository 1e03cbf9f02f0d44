"""Text classification: file reading and bad input, the token cache, dynamic padding, labels through a checkpoint,
predictions on strings, and a tiny BERT that trains."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from lightning import Trainer

from datamodules.text_classification import TextClassificationDataModule, read_rows
from datamodules.token_cache import load_entry, save_entry
from modules.text_classifier import TextClassifier

POSITIVE = ["a great movie", "wonderful and moving", "i loved it", "superb acting", "a joy to watch", "brilliant"]
NEGATIVE = ["a dull mess", "boring and far too long", "i hated it", "awful acting", "a waste of time", "terrible"]


def write_tsv(path: Path, rows: list[tuple[str, str]], header: str = "sentence\tlabel") -> Path:
    path.write_text("\n".join([header, *[f"{t}\t{y}" for t, y in rows]]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    rows = [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE]
    write_tsv(tmp_path / "train.tsv", rows * 2)
    write_tsv(tmp_path / "dev.tsv", rows[:3] + rows[-3:])
    return tmp_path


def _data(root: Path, **kwargs) -> TextClassificationDataModule:
    options = dict(tokenizer="bert-tiny", batch_size=4, cache_dir=str(root / "cache"), max_length=32)
    dm = TextClassificationDataModule(str(root), **(options | kwargs))
    dm.setup("fit")
    return dm


def test_labels_from_train_and_dynamic_padding(text_dir: Path) -> None:
    dm = _data(text_dir, group_by_length=False)
    assert dm.class_names == ["neg", "pos"] and dm.num_classes == 2
    batch = next(iter(dm.val_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == lengths.max() < 32  # padded to the longest in the batch, not max_length
    assert batch["labels"].tolist() == [1, 1, 1, 0]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()


def test_length_grouping_reduces_padding(text_dir: Path) -> None:
    rows = [("word " * n).strip() for n in (1, 20, 2, 19, 3, 18, 4, 17, 5, 16, 6, 15)]
    write_tsv(text_dir / "train.tsv", [(t, "pos" if i % 2 else "neg") for i, t in enumerate(rows)] * 4)

    def padding(dm) -> int:
        return sum(int((b["attention_mask"] == 0).sum()) for b in dm.train_dataloader())

    torch.manual_seed(0)
    assert padding(_data(text_dir, group_by_length=True, batch_size=4)) < padding(
        _data(text_dir, group_by_length=False, batch_size=4, cache_dir=str(text_dir / "c2"))
    )


def test_tokenization_is_cached_and_invalidated(text_dir: Path) -> None:
    first = _data(text_dir)  # setup without prepare_data: an empty cache, so setup tokenizes and writes it
    assert first.cache_hits == 0 and first.tokenized == 2 and len(list((text_dir / "cache").glob("*.pt"))) == 2
    again = _data(text_dir)
    assert again.cache_hits == 2 and again.tokenized == 0
    assert torch.equal(again.datasets["train"].flat["input_ids"], first.datasets["train"].flat["input_ids"])
    assert _data(text_dir, max_length=16).cache_hits == 0  # another length is another key
    write_tsv(text_dir / "dev.tsv", [("an entirely new sentence", "pos"), ("and another", "neg")])
    changed = _data(text_dir)
    assert changed.cache_hits == 1  # train reused, the edited dev file tokenized again


def refuse_to_tokenize(monkeypatch) -> None:
    """Make any call of a tokenizer (transformers tokenizers are called through this one method) an error."""
    from transformers import PreTrainedTokenizerBase

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was called")

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", refuse)


def test_prepare_data_tokenizes_and_a_fresh_setup_only_loads(text_dir: Path, monkeypatch) -> None:
    options = dict(tokenizer="bert-tiny", batch_size=4, cache_dir=str(text_dir / "cache"), max_length=32)
    prepared = TextClassificationDataModule(str(text_dir), **options)
    prepared.prepare_data()  # Lightning: local rank 0 of each node
    assert prepared.tokenized == 2 and len(list((text_dir / "cache").glob("*"))) == 2  # no temporary file left
    assert not hasattr(prepared, "datasets") and not hasattr(prepared, "tokenizer")  # setup relies on none of it
    with monkeypatch.context() as patch:  # another rank: a fresh object that only runs setup
        refuse_to_tokenize(patch)
        rank1 = TextClassificationDataModule(str(text_dir), **options)
        rank1.setup("fit")
        batches = list(rank1.train_dataloader())
    assert rank1.cache_hits == 2 and rank1.tokenized == 0
    alone = _data(text_dir, cache_dir=str(text_dir / "elsewhere"), group_by_length=False)  # setup on an empty cache
    assert alone.tokenized == 2 and alone.cache_hits == 0
    for split in ("train", "val"):
        for key, ids in alone.datasets[split].flat.items():
            assert torch.equal(rank1.datasets[split].flat[key], ids)
        assert torch.equal(rank1.datasets[split].labels, alone.datasets[split].labels)
    assert sum(len(b["labels"]) for b in batches) == len(alone.datasets["train"]) == 24
    prepared.setup("fit")  # the rank that prepared loads what it wrote
    assert prepared.cache_hits == 2 and prepared.tokenized == 2
    again = TextClassificationDataModule(str(text_dir), **options)
    again.prepare_data()
    assert again.tokenized == 0  # a later run finds the entries
    write_tsv(text_dir / "dev.tsv", [("an entirely new sentence", "pos"), ("and another", "neg")])
    edited = TextClassificationDataModule(str(text_dir), **options)
    edited.prepare_data()
    assert edited.tokenized == 1  # a changed file is another key; train is reused
    fresh = TextClassificationDataModule(str(text_dir), **options)
    fresh.setup("fit")
    assert fresh.cache_hits == 2 and fresh.tokenized == 0 and len(fresh.datasets["val"]) == 2


def test_a_cache_entry_is_written_once_and_never_replaced(tmp_path: Path) -> None:
    entry = tmp_path / "cache" / "key.pt"
    assert save_entry({"ids": torch.arange(3)}, entry)
    assert not save_entry({"ids": torch.arange(5)}, entry)  # another process (node) with the same key: harmless
    assert torch.equal(load_entry(entry)["ids"], torch.arange(3))
    assert [p.name for p in entry.parent.iterdir()] == ["key.pt"]


class PreparedTextData(TextClassificationDataModule):
    """Writes a line to ``prepare_data.log`` per ``prepare_data`` call, and each rank's counters after ``setup``."""

    def prepare_data(self) -> None:
        super().prepare_data()
        with open(Path(self.options.data_dir) / "prepare_data.log", "a") as log:
            log.write(f"{os.getpid()}\n")

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        counters = {"cache_hits": self.cache_hits, "tokenized": self.tokenized}
        (Path(self.options.data_dir) / f"rank{self.trainer.global_rank}.json").write_text(json.dumps(counters))


@pytest.mark.slow  # two spawned processes
def test_ddp_prepares_once_and_the_other_rank_only_loads(text_dir: Path, monkeypatch) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    monkeypatch.delenv("MASTER_PORT", raising=False)  # an earlier DDP test's port may still be bound
    options = dict(tokenizer="bert-tiny", batch_size=4, cache_dir=str(text_dir / "cache"), max_length=32)
    model = TextClassifier("bert-tiny", class_names=["neg", "pos"])
    trainer = Trainer(
        default_root_dir=text_dir,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="spawn", process_group_backend="gloo"),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, PreparedTextData(str(text_dir), **options))
    assert len((text_dir / "prepare_data.log").read_text().splitlines()) == 1
    rank0, rank1 = (json.loads((text_dir / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == {"cache_hits": 2, "tokenized": 2}  # prepared, then loaded what it wrote
    assert rank1 == {"cache_hits": 2, "tokenized": 0}  # only loaded


def test_formats_csv_json_jsonl_and_headerless(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",1\nbye,0\n', encoding="utf-8")
    assert read_rows(tmp_path / "a.csv")[0] == {"text": "hello, world", "label": "1"}
    (tmp_path / "a.jsonl").write_text('{"text": "hi", "label": 2}\n{"text": "yo", "label": 0}\n')
    assert read_rows(tmp_path / "a.jsonl")[1] == {"text": "yo", "label": "0"}
    (tmp_path / "a.json").write_text(json.dumps({"data": [{"text": "x", "label": "b"}]}))
    assert read_rows(tmp_path / "a.json") == [{"text": "x", "label": "b"}]
    (tmp_path / "b.tsv").write_text('he said "no\tWorld\n', encoding="utf-8")  # bare quote: TSV is unquoted
    assert read_rows(tmp_path / "b.tsv", ["text", "label"]) == [{"text": 'he said "no', "label": "World"}]


def test_numeric_labels_sort_as_numbers(text_dir: Path) -> None:
    rows = [(f"text {i}", str(i % 11)) for i in range(33)]
    write_tsv(text_dir / "train.tsv", rows)
    write_tsv(text_dir / "dev.tsv", rows[:5])
    assert _data(text_dir).class_names == [str(i) for i in range(11)]


def test_missing_column_lists_the_columns(text_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"train.tsv line 2: no 'text' field; its fields are \['sentence', 'label'\]"):
        _data(text_dir, text_column="text")


def test_empty_texts_are_skipped_with_a_count(text_dir: Path) -> None:
    write_tsv(text_dir / "train.tsv", [("good", "pos"), ("   ", "neg"), ("", "pos"), ("bad", "neg")])
    with pytest.warns(UserWarning, match=r"train.tsv: skipped 2 row\(s\) with an empty 'sentence' \(line 3, line 4\)"):
        dm = _data(text_dir)
    assert len(dm.datasets["train"]) == 2


def test_unseen_label_in_val_is_an_error(text_dir: Path) -> None:
    write_tsv(text_dir / "dev.tsv", [("fine", "pos"), ("meh", "neutral")])
    with pytest.raises(ValueError, match=r"dev.tsv line 3: label 'neutral' is not among the training labels"):
        _data(text_dir)


def test_bytes_that_are_not_utf8_name_the_line(text_dir: Path) -> None:
    (text_dir / "train.tsv").write_bytes(b"sentence\tlabel\ngood\tpos\ncaf\xe9\tneg\n")
    with pytest.raises(ValueError, match=r"train.tsv line 3: bytes that are not UTF-8"):
        _data(text_dir)


def test_empty_file_is_an_error(text_dir: Path) -> None:
    (text_dir / "dev.tsv").write_text("")
    with pytest.raises(ValueError, match="dev.tsv is empty"):
        _data(text_dir)


def test_the_cli_links_the_encoder_to_the_tokenizer_and_the_classes_to_the_model(
    text_dir: Path, tmp_path: Path
) -> None:
    from scripts.train import main

    args = ["--config", "configs/text_sst2.yaml", "--data.init_args.data_dir", str(text_dir),
            "--data.init_args.cache_dir", str(tmp_path), "--data.init_args.max_length", "40",
            "--data.init_args.test_file", "null",
            "--model.init_args.encoder", "bert-tiny", "--trainer.logger", "false"]  # fmt: skip
    cli = main(args, run=False)
    assert cli.datamodule.options.tokenizer == "bert-tiny"  # one name: the data tokenizes for the model's encoder
    assert cli.model.hparams.class_names == ["neg", "pos"]  # read before setup, from the training file
    assert cli.model.hparams.predict_max_length == 40


def test_encoder_layer_groups_feed_the_engine() -> None:
    model = TextClassifier("bert-tiny", num_classes=2, pooling="pooler", lr=1e-3, backbone_lr=1e-4, layer_decay=0.5)
    assert list(model.layer_groups) == ["embeddings", "layer0", "layer1", "top"]
    lrs = {g["name"]: g["lr"] for g in model.configure_optimizers().param_groups}
    assert lrs["head"] == 1e-3 and lrs["backbone.top"] == pytest.approx(1e-4)
    assert lrs["backbone.layer1"] == pytest.approx(5e-5) and lrs["backbone.embeddings"] == pytest.approx(1.25e-5)
    mean = TextClassifier("bert-tiny", num_classes=2, pooling="mean")
    assert "top" not in mean.layer_groups and mean.backbone.pooler is None  # an unused pooler is not trained


def test_mean_pooling_ignores_padding() -> None:
    model = TextClassifier("bert-tiny", num_classes=2, pooling="mean", dropout=0.0).eval()
    ids = torch.tensor([[101, 2204, 102]])
    short = model({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    padded_ids = torch.tensor([[101, 2204, 102, 0, 0]])
    padded = model({"input_ids": padded_ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0]])})
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=1e-5)


def test_tiny_bert_learns_labels_survive_a_checkpoint_and_predict_strings(text_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TextClassifier("bert-tiny", lr=3e-3, backbone_lr=3e-3, dropout=0.0, class_names=["neg", "pos"])
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=12,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, _data(text_dir))
    assert trainer.callback_metrics["val/acc"] == 1.0
    trainer.save_checkpoint(tmp_path / "text.ckpt")
    restored = TextClassifier.load_from_checkpoint(tmp_path / "text.ckpt")
    assert restored.hparams.class_names == ["neg", "pos"]
    predictions = restored.predict_texts(["i loved it", "boring and far too long"])
    assert [p["label"] for p in predictions] == ["pos", "neg"]
    assert all(abs(sum(p["probs"].values()) - 1) < 1e-5 and p["score"] > 0.5 for p in predictions)
    (tmp_path / "inbox.jsonl").write_text('{"text": "superb acting"}\n{"text": "a waste of time"}\n')
    assert [p["label"] for p in restored.predict_file(str(tmp_path / "inbox.jsonl"), "text")] == ["pos", "neg"]
    with pytest.raises(ValueError, match="no column 'sentence'; its columns are \\['text'\\]"):
        restored.predict_file(str(tmp_path / "inbox.jsonl"))


def test_multi_label_targets_and_loss(text_dir: Path) -> None:
    write_tsv(
        text_dir / "train.tsv",
        [("cheap and fast", "price|speed"), ("slow", "speed"), ("pricey", "price"), ("ok", "other")],
    )
    write_tsv(text_dir / "dev.tsv", [("fast", "speed")])
    dm = _data(text_dir, multi_label=True)
    assert dm.class_names == ["other", "price", "speed"]
    assert dm.datasets["train"].labels[0].tolist() == [0.0, 1.0, 1.0]
    model = TextClassifier("bert-tiny", multi_label=True, class_names=dm.class_names)
    batch = next(iter(dm.train_dataloader()))
    inputs, labels = model.split_batch(batch)
    assert model.loss(model(inputs), labels).ndim == 0
    out = model.predict_step(batch, 0)
    assert out["pred"].shape == (4, 3) and out["pred"].dtype == torch.bool


def test_sentence_pairs_get_segment_ids(tmp_path: Path) -> None:
    rows = ["premise\thypothesis\tlabel", "a man sleeps\ta person rests\tyes", "a dog runs\ta cat sits\tno"]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(rows) + "\n")
    dm = _data(tmp_path, text_column="premise", text_pair_column="hypothesis")
    item = dm.datasets["train"][0]
    assert 1 in item["token_type_ids"] and item["token_type_ids"][0] == 0
    assert item["input_ids"].count(102) == 2  # [CLS] premise [SEP] hypothesis [SEP]


def test_overfitting_one_batch_drives_the_loss_down() -> None:
    torch.manual_seed(0)
    model = TextClassifier("bert-tiny", num_classes=3, dropout=0.0, lr=1e-2, backbone_lr=1e-2, weight_decay=0.0)
    ids = torch.randint(1000, 2000, (6, 10))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = model.configure_optimizers()
    losses = []
    for _ in range(40):
        loss = model.loss(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
