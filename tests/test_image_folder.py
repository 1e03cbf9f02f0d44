"""ImageFolderDataModule on folders the tests write: layouts, splits, class names and every bad input."""

from __future__ import annotations

import pytest
import torch

from datamodules.image_folder import ImageFolderDataModule
from tests.conftest import write_images


def _setup(root, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(str(root), image_size=16, batch_size=4, num_workers=0, **kwargs)
    dm.setup("fit")
    return dm


def test_single_folder_is_split_per_class_by_fractions_and_seed(image_folder) -> None:
    dm = _setup(image_folder, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert dm.class_names == ["blue", "red"] and dm.num_classes == 2
    sizes = {name: len(samples) for name, samples in dm.splits.items()}
    assert sizes == {"train": 12, "val": 6, "test": 6}
    for samples in dm.splits.values():  # stratified: both classes in every split
        assert {label for _, label in samples} == {0, 1}
    all_paths = [p for samples in dm.splits.values() for p, _ in samples]
    assert len(set(all_paths)) == 24  # disjoint and complete
    again = _setup(image_folder, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert again.splits == dm.splits
    other = _setup(image_folder, val_fraction=0.25, test_fraction=0.25, seed=4)
    assert other.splits["test"] != dm.splits["test"]


def test_split_layout_and_batches(split_image_folder) -> None:
    dm = _setup(split_image_folder)
    assert dm.class_names == ["blue", "green", "red"]
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 24, "val": 9, "test": 6}
    assert all(path.parts[-3] == "test" for path, _ in dm.splits["test"])
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    red = dm.class_names.index("red")
    red_images = [dm.val_dataloader().dataset[i][0] for i, (_, y) in enumerate(dm.splits["val"]) if y == red]
    assert all(img[0].mean() > img[2].mean() + 0.3 for img in red_images)  # labels follow the folder names
    train_images, _ = next(iter(dm.train_dataloader()))
    assert train_images.shape == (4, 3, 16, 16)


def test_missing_test_folder_falls_back_to_val_with_a_warning(split_image_folder) -> None:
    import shutil

    shutil.rmtree(split_image_folder / "test")
    with pytest.warns(UserWarning, match="no test/ folder"):
        dm = _setup(split_image_folder)
    assert dm.splits["test"] == dm.splits["val"]


def test_non_image_and_corrupt_files_are_skipped_with_a_warning(image_folder) -> None:
    (image_folder / "red" / "notes.txt").write_text("not an image")
    (image_folder / "red" / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\)") as record:
        dm = _setup(image_folder)
    message = str(record[0].message)
    assert "notes.txt (not an image extension)" in message
    assert "broken.jpg (unreadable image: UnidentifiedImageError)" in message
    names = [p.name for samples in dm.splits.values() for p, _ in samples]
    assert "broken.jpg" not in names and "notes.txt" not in names and len(names) == 24


def test_a_file_that_fails_to_decode_later_names_the_file(image_folder) -> None:
    dm = _setup(image_folder, verify_images=False)
    path = dm.splits["train"][0][0]
    path.write_bytes(b"\xff\xd8 truncated")
    with pytest.warns(UserWarning, match=f"skipped image {path}: it cannot be decoded"):
        assert dm.train_dataloader().dataset[0] is None  # left out of its batch by collate_skipping


def test_empty_class_folder_is_an_error(image_folder) -> None:
    (image_folder / "green").mkdir()
    with pytest.raises(ValueError, match="class folder .*green has no images"):
        _setup(image_folder)


def test_folder_without_class_folders_is_an_error(tmp_path) -> None:
    write_images(tmp_path / "flat", 3, (0, 0, 0))
    with pytest.raises(ValueError, match="no class folders in .*flat"):
        _setup(tmp_path / "flat")


def test_folder_with_no_images_is_an_error(tmp_path) -> None:
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    (tmp_path / "empty" / "cats" / "readme.md").write_text("hello")
    with pytest.raises(ValueError, match="no images found in .*empty"), pytest.warns(UserWarning, match="readme.md"):
        _setup(tmp_path / "empty")


def test_empty_split_after_splitting_is_an_error(tmp_path) -> None:
    write_images(tmp_path / "few" / "a", 2, (0, 0, 0))
    write_images(tmp_path / "few" / "b", 2, (255, 255, 255))
    with pytest.raises(ValueError, match="the test split of .*few is empty"):
        _setup(tmp_path / "few", val_fraction=0.3, test_fraction=0.1)


def test_val_class_unknown_to_train_is_an_error(split_image_folder) -> None:
    write_images(split_image_folder / "val" / "purple", 2, (128, 0, 128))
    with pytest.raises(ValueError, match="val/purple is not one of the training classes"):
        _setup(split_image_folder)


def test_missing_data_dir_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="data.data_dir .*nowhere does not exist"):
        _setup(tmp_path / "nowhere")


def test_predict_dir_lists_images_recursively(image_folder, tmp_path) -> None:
    write_images(tmp_path / "inbox" / "sub", 3, (10, 200, 10))
    dm = _setup(image_folder, predict_dir=str(tmp_path / "inbox"))
    batch, _ = next(iter(dm.predict_dataloader()))
    assert batch.shape == (3, 3, 16, 16) and len(dm.predict_files) == 3
