"""The catalogue of bad input and faults a user meets: each case is a one-line error that names the file and row
(or id, path, step), or a counted, warned skip; never a silent wrong result. Faults: non-finite values, failed and
killed checkpoint saves, debug runs that write nothing, user mistakes on the command line."""

from __future__ import annotations

import errno
import io
import os
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import Trainer
from PIL import Image

from callbacks.reliability import AtomicCheckpointIO, Checkpoint, FiniteGuard, RunError
from datamodules.image_folder import ImageFileDataset, ImageFolderDataModule, collate_skipping, load_rgb
from datamodules.squad import parse_squad
from datamodules.text_classification import TextClassificationDataModule, read_rows
from modules.image_classifier import ImageClassifier
from tests.conftest import REPO, Blobs, write_images
from tests.test_qa import CONTEXT, squad_json

# --- text files ---------------------------------------------------------------------------------------------------


def _text_data(root: Path, **kwargs) -> TextClassificationDataModule:
    options = dict(tokenizer="bert-tiny", batch_size=4, cache_dir=str(root / "cache"), max_length=16)
    dm = TextClassificationDataModule(str(root), **(options | kwargs))
    dm.setup("fit")
    return dm


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_tab_inside_a_tsv_sentence_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.tsv", "sentence\tlabel\na fine day\t1\nit was\tjust ok\t0\n")
    with pytest.raises(ValueError, match=r"train\.tsv line 3: 3 field\(s\) where the header has 2.*cannot hold a tab"):
        read_rows(path)


def test_csv_row_missing_its_label_field_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.csv", "text,label\nfine,1\nno label here\nbad,0\n")
    with pytest.raises(ValueError, match=r"train\.csv line 3: 1 field\(s\) where the header has 2 \(text, label\)"):
        read_rows(path)


def test_csv_quoted_fields_may_hold_commas_tabs_and_newlines(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.csv", 'text,label\n"one, two\tthree",a\n"two\nlines",b\nlast,a\n')
    rows = read_rows(path)
    assert [r["text"] for r in rows] == ["one, two\tthree", "two\nlines", "last"]
    assert [r.at for r in rows] == ["line 2", "line 3", "line 5"]  # a row's first physical line


def test_broken_jsonl_line_names_the_file_and_line_counting_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n')
    with pytest.raises(ValueError, match=r"train\.jsonl line 3: not valid JSON"):
        read_rows(path)


def test_jsonl_line_that_is_not_an_object_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl", '{"text": "a", "label": "x"}\n["b", "y"]\n')
    with pytest.raises(ValueError, match=r"train\.jsonl line 2: a JSON list, not an object"):
        read_rows(path)


def test_jsonl_object_without_the_label_names_the_line_and_its_fields(tmp_path: Path) -> None:
    lines = ['{"text": "good", "label": "pos"}', '{"text": "bad", "label": "neg"}', '{"text": "meh", "lbl": "neg"}']
    _write(tmp_path / "train.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl line 3: no 'label' field; its fields are \['text', 'lbl'\]"):
        _text_data(tmp_path, train_file="train.jsonl", val_file=None, text_column="text")


def test_json_that_is_not_a_list_of_objects_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.json", '{"data": [1, 2]}')
    with pytest.raises(ValueError, match=r"train\.json: expected a JSON list of objects"):
        read_rows(path)


def test_header_without_the_label_column(tmp_path: Path) -> None:
    _write(tmp_path / "train.tsv", "sentence\tsentiment\ngood\t1\nbad\t0\n")
    with pytest.raises(ValueError, match=r"train\.tsv line 2: no 'label' field; its fields are \['sentence', 'sen"):
        _text_data(tmp_path, val_file=None)


def test_bytes_that_are_not_utf8_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff\xfe\t0\n")
    with pytest.raises(ValueError, match=r"train\.tsv line 3: bytes that are not UTF-8"):
        read_rows(tmp_path / "train.tsv")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("train.tsv", "  \n", r"train\.tsv is empty"),
        ("train.xml", "<a/>", r"train\.xml: unknown format '\.xml'"),
        ("train.tsv", "sentence\tlabel\n", r"train\.tsv has no data rows"),
    ],
)
def test_empty_header_only_and_unknown_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_rows(_write(tmp_path / name, content))


def test_missing_file_and_folder_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.train_file .*train\.tsv does not exist"):
        _text_data(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data\.data_dir .*nowhere does not exist"):
        _text_data(tmp_path / "nowhere")


def test_val_label_unknown_to_training_names_the_line(tmp_path: Path) -> None:
    _write(tmp_path / "train.tsv", "sentence\tlabel\ngood\tpos\nbad\tneg\n")
    _write(tmp_path / "dev.tsv", "sentence\tlabel\nfine\tpos\nmeh\tneutral\n")
    with pytest.raises(ValueError, match=r"dev\.tsv line 3: label 'neutral' is not among the training labels"):
        _text_data(tmp_path)


def test_empty_labels_are_skipped_counted_and_named_not_a_class(tmp_path: Path) -> None:
    _write(tmp_path / "train.tsv", "sentence\tlabel\ngood\tpos\nno label\t\nbad\tneg\nalso none\t  \nfine\tpos\n")
    with pytest.warns(UserWarning, match=r"skipped 2 row\(s\) with an empty 'label' \(line 3, line 5\)"):
        dm = _text_data(tmp_path, val_file=None, val_fraction=0.25)
    assert dm.class_names == ["neg", "pos"]
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 3


def test_empty_texts_are_skipped_and_counted(tmp_path: Path) -> None:
    _write(tmp_path / "train.tsv", "sentence\tlabel\ngood\tpos\n \tneg\nbad\tneg\nfine\tpos\n")
    with pytest.warns(UserWarning, match=r"skipped 1 row\(s\) with an empty 'sentence' \(line 3\)"):
        _text_data(tmp_path, val_file=None, val_fraction=0.25)


def test_a_single_training_label_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "train.tsv", "sentence\tlabel\ngood\tpos\nfine\tpos\ngreat\tpos\n")
    with pytest.raises(ValueError, match=r"train\.tsv: every training row has the label 'pos'"):
        _text_data(tmp_path, val_file=None, val_fraction=0.34)


# --- images -------------------------------------------------------------------------------------------------------


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I")
    pixels = np.asarray(load_rgb(tmp_path / "ramp.png"))
    assert pixels.shape == (8, 256, 3)
    assert (pixels == 255).mean() < 0.01  # PIL's convert("RGB") set 99.6% of the ramp to 255
    assert pixels[0, 128, 0] == 128 and pixels[0, 0, 0] == 0 and pixels[0, 255, 0] == 255


def _truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # a valid header, half the data
    return path


def test_truncated_jpeg_is_skipped_with_a_warning_in_training(image_folder: Path) -> None:
    bad = _truncated_jpeg(image_folder / "red" / "zz_truncated.jpg")
    dm = ImageFolderDataModule(str(image_folder), image_size=16, batch_size=64, num_workers=0, val_fraction=0.1,
                               test_fraction=0.1)  # fmt: skip
    dm.setup("fit")  # the header scan passes it
    assert any(p == bad for p, _ in dm.splits["train"])
    with pytest.warns(UserWarning, match=f"skipped image {bad}: it cannot be decoded"):
        images, labels = next(iter(dm.train_dataloader()))
    assert len(images) == len(dm.splits["train"]) - 1 == len(labels)


def test_a_batch_with_no_readable_image_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="none of the 2 images of a batch could be decoded"):
        collate_skipping([None, None])
    with pytest.warns(UserWarning, match=r"skipped image /no/such\.jpg: it cannot be decoded"):
        assert ImageFileDataset([(Path("/no/such.jpg"), 0)])[0] is None


def test_truncated_jpeg_is_skipped_in_predict_and_the_rest_predicted(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 3, (30, 30, 220), seed=5)
    bad = _truncated_jpeg(tmp_path / "in" / "broken.jpg")
    model = ImageClassifier("resnet_tiny", pretrained=False, num_classes=2, class_names=["a", "b"])
    from datamodules.transforms import eval_transform

    transform = eval_transform(16)
    paths = sorted(str(p) for p in (tmp_path / "in").iterdir())
    with pytest.warns(UserWarning, match=rf"skipped 1 image\(s\) that cannot be decoded: {bad}"):
        rows = model.predict_images(paths, lambda p: transform(load_rgb(p)))
    assert [r["input"] for r in rows] == [p for p in paths if p != str(bad)] and len(rows) == 3


def test_single_class_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    write_images(tmp_path / "data" / "cats", 6, (200, 30, 30))
    with pytest.raises(ValueError, match=r"data has one class folder \('cats'\): a classifier needs at least two"):
        ImageFolderDataModule(str(tmp_path / "data")).setup("fit")
    write_images(tmp_path / "split" / "train" / "cats", 6, (200, 30, 30))
    with pytest.raises(ValueError, match=r"split/train has one class folder"):
        ImageFolderDataModule(str(tmp_path / "split")).setup("fit")


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"a": 3, "b": 0}, r"class folder .*/b has no images"),
        ({}, r"no class folders in"),
        ({"a": -1, "b": -1}, r"no images found in"),
    ],
    ids=["empty_class", "no_classes", "no_images"],
)
def test_image_folder_layout_errors(tmp_path: Path, layout: dict, message: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    for name, count in layout.items():
        (root / name).mkdir()
        if count > 0:
            write_images(root / name, count, (100, 100, 100))
        elif count < 0:
            (root / name / "readme.txt").write_text("not an image")
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(str(root)).setup("fit")


def test_val_class_unknown_to_train_is_named(split_image_folder: Path) -> None:
    write_images(split_image_folder / "val" / "purple", 2, (128, 0, 128))
    with pytest.raises(ValueError, match=r"class folder .*val/purple is not one of the training classes"):
        ImageFolderDataModule(str(split_image_folder)).setup("fit")


def test_non_image_files_are_skipped_and_named(image_folder: Path) -> None:
    (image_folder / "red" / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) .*notes\.txt \(not an image extension\)"):
        ImageFolderDataModule(str(image_folder)).setup("fit")


# --- SQuAD --------------------------------------------------------------------------------------------------------


def test_squad_id_used_twice_names_the_id_and_both_articles() -> None:
    data = squad_json({"A": [(CONTEXT, "Who built the tower?", "Gustave Eiffel")], "B": [(CONTEXT, "When?", "1889")]})
    data["data"][1]["paragraphs"][0]["qas"][0]["id"] = "A-0"
    with pytest.raises(ValueError, match=r"f\.json: question id 'A-0' is used twice \(articles 'A' and 'B'\)"):
        parse_squad(data, "f.json", training=False)


def test_squad_answer_start_that_is_not_an_integer_names_the_id() -> None:
    data = squad_json({"A": [(CONTEXT, "Who built the tower?", "Gustave Eiffel")]})
    answer = data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]
    answer["answer_start"] = str(answer["answer_start"])
    with pytest.raises(ValueError, match=r"question 'A-0' has answer_start '\d+', not an integer character offset"):
        parse_squad(data, "f.json", training=True)


def test_not_a_squad_file() -> None:
    with pytest.raises(ValueError, match=r"f\.json: not a SQuAD file"):
        parse_squad([{"question": "?"}], "f.json", training=True)


# --- faults: non-finite values ------------------------------------------------------------------------------------


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> Trainer:
    options = dict(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return Trainer(**(options | kwargs), callbacks=callbacks)


class _PoisonGradient(FiniteGuard.__mro__[1]):  # a Callback that makes one gradient NaN before the guard looks
    def __init__(self, steps: set[int]):
        self.steps = steps

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            pl_module.head[-1].weight.grad[0, 0] = float("nan")


def test_non_finite_gradient_stops_with_step_epoch_batch_and_group(tmp_path: Path) -> None:
    model = ImageClassifier("resnet_tiny", pretrained=False, num_classes=3, class_names=["a", "b", "c"])
    checkpoint = Checkpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, [_PoisonGradient({4}), FiniteGuard(), checkpoint])
    with pytest.raises(RunError) as error:
        trainer.fit(model, Blobs())
    message = str(error.value)
    assert "non-finite gradient at step 4 (epoch 1, batch 1) in parameter group 'head' (head.1.weight)" in message
    assert f"the last good checkpoint is {tmp_path / 'ckpt' / 'last.ckpt'}" in message
    assert "\n" not in message
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_max_skips_skips_the_step_without_any_update_then_stops(tmp_path: Path) -> None:
    model = ImageClassifier("resnet_tiny", pretrained=False, num_classes=3, class_names=["a", "b", "c"])
    before = {}

    class Record(_PoisonGradient):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 1:
                before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    guard = FiniteGuard(max_skips=1)
    trainer = _trainer(tmp_path, [Record({1, 2}), guard], enable_checkpointing=False)
    skipped = pytest.warns(UserWarning, match=r"non-finite gradient at step 1 .*step skipped \(1 of at most 1\)")
    with skipped, pytest.raises(RunError, match="non-finite gradient at step 2 "):  # a skip still counts a step
        trainer.fit(model, Blobs())
    assert guard.skipped == 1
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)


def test_non_finite_loss_stops_before_the_backward(tmp_path: Path) -> None:
    model = ImageClassifier("resnet_tiny", pretrained=False, num_classes=3, class_names=["a", "b", "c"], lr=1e30,
                            backbone_lr=1e30)  # fmt: skip
    trainer = _trainer(tmp_path, [FiniteGuard()], enable_checkpointing=False, max_epochs=5)
    with pytest.raises(RunError, match=r"non-finite training loss \(nan\) at step \d+ \(epoch \d, batch \d\)"):
        trainer.fit(model, Blobs())


def test_non_finite_validation_metric_is_never_saved_as_best(tmp_path: Path) -> None:
    model = ImageClassifier("resnet_tiny", pretrained=False, num_classes=3, class_names=["a", "b", "c"])

    class PoisonValidation(_PoisonGradient):  # NaN weights during epoch 1's validation only: val/loss is NaN
        def on_validation_start(self, trainer, pl_module):
            self.saved = pl_module.head[-1].bias.detach().clone()
            if trainer.current_epoch == 1:
                pl_module.head[-1].bias.data.fill_(float("nan"))

        def on_validation_end(self, trainer, pl_module):
            pl_module.head[-1].bias.data.copy_(self.saved)

    checkpoint = Checkpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", save_last=True)
    trainer = _trainer(tmp_path, [PoisonValidation(set()), FiniteGuard(), checkpoint], max_epochs=3)
    with pytest.raises(RunError, match=r"non-finite val/loss \(nan\) after epoch 1"):
        trainer.fit(model, Blobs())
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]


# --- faults: checkpoints ------------------------------------------------------------------------------------------


def test_failed_save_keeps_the_previous_checkpoint_and_names_the_path(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"weights": torch.ones(3)}, path)
    good = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RunError, match=rf"could not save the checkpoint {path}: .*No space left on device.*is kept"):
        io.save_checkpoint({"weights": torch.zeros(3)}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_killed_save_leaves_the_old_checkpoint_and_its_leftover_is_removed(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    (tmp_path / ".last.ckpt.99999.tmp").write_bytes(b"half a checkpoint")  # what a kill during a save leaves
    assert torch.load(path, weights_only=True) == {"step": 1}
    io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_missing_and_corrupt_checkpoints_are_named(tmp_path: Path) -> None:
    from scripts.from_run import load_run

    with pytest.raises(FileNotFoundError, match=r"checkpoint .*missing\.ckpt does not exist"):
        load_run(str(tmp_path / "missing.ckpt"))
    (tmp_path / "config.yaml").write_text("model:\n  class_path: modules.image_classifier.ImageClassifier\n")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"checkpoint .*bad\.ckpt cannot be loaded \("):
        load_run(str(tmp_path / "bad.ckpt"))


# --- user mistakes --------------------------------------------------------------------------------------------------


def test_weights_that_need_the_internet_name_the_offline_backbones(monkeypatch) -> None:
    from modules import backbones

    def offline(pretrained: bool):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setitem(backbones._REGISTRY, "resnet18", offline)
    with pytest.raises(RuntimeError, match=r"backbone 'resnet18' could not load its pretrained weights") as error:
        backbones.build_backbone("resnet18")
    assert "efficientnet_lite0" in str(error.value) and "--model.init_args.pretrained false" in str(error.value)


def test_a_hub_text_encoder_offline_names_the_offline_encoders() -> None:
    from modules.text_encoder import build_text_encoder

    with pytest.raises(RuntimeError, match=r"text encoder 'no-such-org/no-such-model' is not a local model folder"):
        build_text_encoder("no-such-org/no-such-model")


def test_a_folder_given_to_a_text_model_is_named(tmp_path: Path, monkeypatch) -> None:
    from modules.text_classifier import TextClassifier
    from scripts import predict

    model = TextClassifier("bert-tiny", num_classes=2, class_names=["neg", "pos"])
    monkeypatch.setattr(predict, "load_run", lambda ckpt, config: (model, {"data": {}}, tmp_path))
    monkeypatch.setattr(predict, "build_datamodule", lambda settings: None)
    with pytest.raises(ValueError, match=rf"{tmp_path} is a folder; a text classifier predicts on a .txt, CSV"):
        predict.predict("x.ckpt", str(tmp_path))


def test_debug_run_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    from scripts.train import main

    monkeypatch.chdir(tmp_path)
    tiny = ["--model.init_args.backbone=resnet_tiny", "--model.init_args.pretrained=false"]
    main(["fit", "--config", str(REPO / "configs/digits.yaml"), "--config", str(REPO / "configs/presets/debug.yaml"),
          *tiny, "--data.init_args.image_size=16"])  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_a_huge_lr_through_the_cli_stops_and_saves_nothing(tmp_path: Path, monkeypatch) -> None:
    from scripts.train import main

    monkeypatch.chdir(tmp_path)
    args = [
        "--model.init_args.backbone=resnet_tiny",
        "--model.init_args.pretrained=false",
        "--data.init_args.image_size=16",
    ]
    with pytest.raises(RunError, match="non-finite training loss"):
        main(["fit", "--config", str(REPO / "configs/digits.yaml"), *args, "--model.init_args.lr=1e30",
              "--model.init_args.backbone_lr=1e30", "--trainer.max_epochs=3"])  # fmt: skip
    assert list(tmp_path.glob("runs/digits/*/checkpoints/*.ckpt")) == []


def _cli(tmp_path: Path, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline")
    for inherited in ("FT_DEBUG", "FT_RUN_DIR", "WANDB_SERVICE"):
        env.pop(inherited, None)
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "fit", "--config", str(REPO / "configs/digits.yaml")]
    return subprocess.run([*command, *args, *(["--debug"] if debug else [])], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.init_args.backbone=resnet_huge"], r"unknown backbone 'resnet_huge'; known backbones: .*resnet18"),
        (["--ckpt_path", "last"], r"--ckpt_path last: no run under runs/digits has a checkpoints/last\.ckpt"),
        (["--run", "runs/digits/version_7"], r"--run runs/digits/version_7: no such run folder"),
        (["--ckpt_path", "nowhere.ckpt"], r"--ckpt_path nowhere\.ckpt: no such checkpoint file"),
    ],
    ids=["unknown_backbone", "last_without_run", "unknown_run", "missing_ckpt"],
)
def test_user_mistakes_print_one_line_and_exit_1(tmp_path: Path, args: list[str], message: str) -> None:
    result = _cli(tmp_path, *args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-2000:]
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in result.stderr and "(--debug shows the traceback)" in errors[0]
    assert not list(tmp_path.glob("runs/digits/version_*"))  # no folder left behind


@pytest.mark.slow
def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    result = _cli(tmp_path, "--model.init_args.backbone=resnet_huge", debug=True)
    assert result.returncode == 1 and "Traceback" in result.stderr and "unknown backbone" in result.stderr
