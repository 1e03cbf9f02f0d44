"""Pre-training and the hand-off of its backbone to fine-tuning: export/load round trips, the key check, MLM masking,
the pre-training data, and a tiny pre-train -> fine-tune (and compare) run from the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from datamodules.mnist import MnistDataModule, read_idx
from datamodules.text_lines import TextLinesDataModule
from modules.handoff import export_backbone, read_backbone
from modules.image_classifier import ImageClassifier
from modules.mlm import MaskedLM
from modules.param_groups import build_param_groups
from modules.qa import ExtractiveQA
from modules.text_classifier import TextClassifier
from scripts.train import main


def _images(seed: int = 0) -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_image_backbone_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    source = ImageClassifier("resnet_tiny", num_classes=3, pretrained=False).eval()
    folder = export_backbone(source, tmp_path / "backbone", source="test")
    meta = json.loads((folder / "backbone.json").read_text())
    assert meta["name"] == "resnet_tiny" and meta["kind"] == "image"
    assert meta["layer_groups"] == {g: list(p) for g, p in source.layer_groups.items()}
    assert meta["mean"] == pytest.approx(source.normalize.mean.flatten().tolist())

    target = ImageClassifier("resnet_tiny", num_classes=5, pretrained=False, backbone_checkpoint=str(folder)).eval()
    images = source.normalize(_images())
    assert torch.equal(target.backbone(images), source.backbone(images))
    assert target.head[-1].out_features == 5  # a new head for the new task

    fresh = ImageClassifier("resnet_tiny", num_classes=5, pretrained=False).eval()
    assert not torch.equal(fresh.backbone(images), source.backbone(images))  # the equality above is not a given


@torch.no_grad()
def test_mlm_encoder_hands_off_to_classification_and_qa(tmp_path: Path) -> None:
    mlm = MaskedLM("bert-tiny").eval()
    # The language-model head's output matrix is the word embeddings (tied), and the optimizer holds it once.
    assert mlm.head.predictions.decoder.weight is mlm.backbone.embeddings.word_embeddings.weight
    groups = build_param_groups(mlm.backbone, mlm.layer_groups, mlm.head, 1e-3, 1e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in mlm.parameters()})

    folder = export_backbone(mlm, tmp_path / "backbone")
    assert json.loads((folder / "backbone.json").read_text())["kind"] == "text"
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]]), "attention_mask": torch.ones(1, 6)}
    expected = mlm.backbone(**batch).last_hidden_state
    classifier = TextClassifier("bert-tiny", num_classes=2, pretrained=False, backbone_checkpoint=str(folder)).eval()
    qa = ExtractiveQA("bert-tiny", pretrained=False, backbone_checkpoint=str(folder)).eval()
    for model in (classifier, qa):
        assert torch.equal(model.backbone(**batch).last_hidden_state, expected)


def test_key_check_rejects_a_mismatched_backbone_and_lists_the_keys(tmp_path: Path) -> None:
    folder = export_backbone(ImageClassifier("resnet_tiny", num_classes=3, pretrained=False), tmp_path / "tiny")
    with pytest.raises(ValueError, match=r"holds a 'resnet_tiny' backbone but the model is built with 'resnet18'"):
        ImageClassifier("resnet18", num_classes=3, pretrained=False, backbone_checkpoint=str(folder))

    state = load_file(str(folder / "backbone.safetensors"))
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "edited.safetensors"))  # no backbone.json beside it: only the keys can tell
    with pytest.raises(ValueError) as err:
        ImageClassifier("resnet_tiny", num_classes=3, backbone_checkpoint=str(tmp_path / "edited.safetensors"))
    message = str(err.value)
    assert "missing keys [backbone.layer1.0.conv1.weight]" in message
    assert "unexpected keys [backbone.extra.weight]" in message
    assert "head." not in message  # the new head's keys are the ones allowed to be missing

    text = export_backbone(MaskedLM("bert-tiny"), tmp_path / "text")
    with pytest.raises(ValueError, match=r"missing keys \[backbone\.pooler\.dense\.weight, backbone\.pooler"):
        TextClassifier("bert-tiny", num_classes=2, pooling="pooler", backbone_checkpoint=str(text))

    big = ImageClassifier("resnet_tiny", num_classes=3, pretrained=False)
    big.backbone.conv1 = torch.nn.Conv2d(3, 64, 3, bias=False)  # same names, another shape
    torch.save({"state_dict": big.state_dict(), "hyper_parameters": {"backbone": "resnet_tiny"}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match=r"does not fit: size mismatch for backbone\.conv1\.weight"):
        ImageClassifier("resnet_tiny", num_classes=3, backbone_checkpoint=str(tmp_path / "x.ckpt"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageClassifier("resnet_tiny", num_classes=3, backbone_checkpoint=str(tmp_path / "nowhere"))


def test_lightning_checkpoint_keeps_the_backbone_and_drops_the_old_head(tmp_path: Path) -> None:
    source = ImageClassifier("resnet_tiny", num_classes=7, pretrained=False)
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams)}, tmp_path / "run.ckpt")
    state, meta = read_backbone(tmp_path / "run.ckpt")
    assert meta == {"name": "resnet_tiny"}
    assert set(state) == set(source.backbone.state_dict())
    target = ImageClassifier("resnet_tiny", num_classes=2, backbone_checkpoint=str(tmp_path / "run.ckpt"))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(target.backbone.state_dict()[key], value), key


def _corpus(tmp_path: Path, lines: int = 400) -> Path:
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "seven", "dogs", "ran", "past", "quickly", "under"]
    text = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 9)) for i in range(lines)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(text[:10] + ["", "   "] + text[10:]) + "\n")
    return path


def test_mlm_masking_rates_and_fixed_validation_masks(tmp_path: Path) -> None:
    data = TextLinesDataModule(files=[str(_corpus(tmp_path))], tokenizer="bert-tiny", batch_size=16, max_length=16)
    data.setup("fit")
    tokenizer = data.tokenizer
    chosen = maskable = as_mask = kept = 0
    for _ in range(5):
        for batch in data.train_dataloader():
            original = batch["input_ids"].clone()
            labels = batch["labels"]
            picked = labels != -100
            special = torch.isin(labels.where(picked, original), torch.tensor(tokenizer.all_special_ids))
            padding = batch["attention_mask"] == 0
            assert not (picked & (padding | special)).any()  # never padding, [CLS] or [SEP]
            chosen += picked.sum().item()
            maskable += (~padding & ~special).sum().item()
            as_mask += (picked & (original == tokenizer.mask_token_id)).sum().item()
            kept += (picked & (original == labels)).sum().item()
    assert chosen / maskable == pytest.approx(0.15, abs=0.01)
    assert as_mask / chosen == pytest.approx(0.8, abs=0.03)
    assert kept / chosen == pytest.approx(0.1, abs=0.03)  # the rest (about 10%) became random tokens

    first = list(data.val_dataloader())
    again = TextLinesDataModule(files=[str(_corpus(tmp_path))], tokenizer="bert-tiny", batch_size=16, max_length=16)
    again.setup("fit")
    for a, b, c in zip(first, data.val_dataloader(), again.val_dataloader(), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], c["labels"])


def test_long_documents_become_several_sequences_and_bad_input_is_named(tmp_path: Path) -> None:
    words = [f"word{i}" for i in range(40)]
    (tmp_path / "long.txt").write_text(" ".join(words) + "\nshort one\nand another\n")
    data = TextLinesDataModule(files=[str(tmp_path / "long.txt")], tokenizer="bert-tiny", max_length=12)
    data.setup("fit")
    encoded = data.encode([" ".join(words)])
    assert all(len(s) <= 12 for s in encoded.sequences) and len(encoded) > 1
    pieces = [data.tokenizer.decode(s, skip_special_tokens=True) for s in encoded.sequences]
    assert " ".join(pieces).replace(" ##", "") == " ".join(words)  # no token lost between sequences

    (tmp_path / "rows.csv").write_text("body,source\nhello there,x\n")
    with pytest.raises(ValueError, match=r"rows.csv has no column 'text'; its columns: body, source"):
        TextLinesDataModule(files=[str(tmp_path / "rows.csv")], tokenizer="bert-tiny").setup("fit")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="blank.txt: no text; train and val need two or more"):
        TextLinesDataModule(files=[str(tmp_path / "blank.txt")], tokenizer="bert-tiny").setup("fit")
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        TextLinesDataModule(files=[str(tmp_path / "missing.txt")], tokenizer="bert-tiny").setup("fit")


def test_mnist_data_and_idx_reader(tmp_path: Path) -> None:
    data = MnistDataModule(max_samples=600, image_size=16, seed=3)
    data.setup("fit")
    sizes = (len(data.train_set), len(data.val_set), len(data.test_set))
    assert sum(sizes) == 600 and sizes[1] == 60 and sizes[2] == 120
    image, _ = data.val_set[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert torch.bincount(data.train_set.labels, minlength=10).min() >= 40  # stratified: every class is there

    pixels = torch.arange(2 * 3 * 4, dtype=torch.uint8).view(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (2, 3, 4))
    (tmp_path / "x-idx3-ubyte").write_bytes(header + pixels.numpy().tobytes())
    assert (read_idx(tmp_path / "x-idx3-ubyte") == pixels.numpy()).all()
    (tmp_path / "short-idx3-ubyte").write_bytes(header + b"\x00" * 5)
    with pytest.raises(ValueError, match=r"header says shape \(2, 3, 4\) but the file holds 5 values"):
        read_idx(tmp_path / "short-idx3-ubyte")
    with pytest.raises(FileNotFoundError, match="make fashion-mnist"):
        MnistDataModule("fashion_mnist", data_dir=str(tmp_path)).setup("fit")


def _tiny_image_args(tmp_path: Path) -> list[str]:
    return [
        "--model.backbone=resnet_tiny",
        "--data.image_size=16",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
    ]


@pytest.mark.slow
def test_pretrain_then_finetune_and_compare_from_the_command_line(tmp_path: Path, monkeypatch) -> None:
    from scripts.compare import compare

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # runs/ is written here
    pretrain = main(
        [
            "fit",
            "--config",
            str(repo / "configs/pretrain_image.yaml"),
            *_tiny_image_args(tmp_path),
            "--data.max_samples=400",
            "--data.batch_size=32",
        ]
    )
    run_dir = Path(pretrain.trainer.log_dir)
    folder = run_dir / "backbone"
    best = pretrain.trainer.checkpoint_callback.best_model_path
    exported = load_file(str(folder / "backbone.safetensors"))
    saved = torch.load(best, weights_only=True)["state_dict"]
    assert exported and all(torch.equal(v, saved[f"backbone.{k}"]) for k, v in exported.items())
    assert json.loads((folder / "backbone.json").read_text())["source"] == best

    # Fine-tune on the digits with the backbone frozen throughout: its weights must stay the exported ones, which
    # shows the run started from them; the scratch arm must not.
    frozen = tmp_path / "frozen.yaml"
    freeze = {"unfreeze_epoch": 9, "bn_policy": "freeze_all"}
    callbacks = [
        {"class_path": "callbacks.unfreezing.FreezeUnfreeze", "init_args": freeze},
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"monitor": "val/acc", "mode": "max"},
        },
    ]
    frozen.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    rows = compare(
        str(repo / "configs/finetune_image.yaml"),
        str(folder),
        seeds=[0],
        arms=["pretrained", "scratch"],
        out=tmp_path / "compare",
        extra=["--config", str(frozen), *_tiny_image_args(tmp_path)],
    )
    assert [r["arm"] for r in rows] == ["pretrained", "scratch"]
    results = json.loads((tmp_path / "compare" / "results.json").read_text())
    for run in results["runs"]:
        tuned = torch.load(run["best_checkpoint"], weights_only=True)["state_dict"]
        same = all(torch.equal(tuned[f"backbone.{k}"], v) for k, v in exported.items())
        assert same == (run["arm"] == "pretrained"), run["arm"]
        assert 0 <= run["test"]["test/acc"] <= 1
    table = (tmp_path / "compare" / "results.md").read_text()
    assert "| pretrained |" in table and "| scratch |" in table


@pytest.mark.slow
def test_text_pretrain_then_finetune_from_the_command_line(tmp_path: Path, monkeypatch) -> None:
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    tiny = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]
    pretrain = main(
        [
            "fit",
            "--config",
            str(repo / "configs/pretrain_text.yaml"),
            "--model.encoder=bert-tiny",
            "--data.tokenizer=bert-tiny",
            f"--data.files=[{_corpus(tmp_path)}]",
            "--data.max_length=16",
            *tiny,
        ]
    )
    tested = pretrain.results["test"]
    assert tested["test/perplexity"] == pytest.approx(math.exp(tested["test/loss"]), rel=1e-4)
    folder = Path(pretrain.trainer.log_dir) / "backbone"
    exported = load_file(str(folder / "backbone.safetensors"))

    rows = [f"fine film {i}\t{i % 2}" if i % 2 else f"dull plot {i}\t0" for i in range(12)]
    for name in ("train.tsv", "dev.tsv", "glue_dev.tsv"):
        (tmp_path / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    finetune = main(
        [
            "fit",
            "--config",
            str(repo / "configs/finetune_text.yaml"),
            "--model.encoder=bert-tiny",
            "--data.tokenizer=bert-tiny",
            f"--model.backbone_checkpoint={folder}",
            f"--data.data_dir={tmp_path}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--trainer.limit_train_batches=0",  # no step: the encoder must be exactly the exported one
            "--trainer.max_epochs=1",
        ]
    )
    encoder = finetune.model.backbone.state_dict()
    assert all(torch.equal(encoder[k], v) for k, v in exported.items())
