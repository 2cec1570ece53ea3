"""Data sources and on-device transforms."""

import numpy as np
import pytest
import torch
from PIL import Image

from rotnet_cli import data
from rotnet_cli.errors import DataError


def _write_images(folder, n, size=(20, 12), fmt="png", seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i}.{fmt}")


def test_digits_are_upsampled_rgb_uint8_with_labels():
    src = data.open_source("digits", 32)
    images = src.train
    assert images.images.shape == (1797, 3, 32, 32) and images.images.dtype == torch.uint8
    assert torch.equal(images.images[:, 0], images.images[:, 2])  # grey replicated
    assert images.labels.shape == (1797,) and set(images.labels.tolist()) == set(range(10))


def test_flat_folder_is_recursive_and_unlabelled(tmp_path):
    _write_images(tmp_path / "a", 3)
    _write_images(tmp_path / "a" / "deeper", 2, fmt="jpg")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "loose.png").write_bytes(b"")  # a loose file makes it a flat folder
    src = data.open_source(str(tmp_path), 16, cache="none")
    assert len(src.train) == 6 and src.train.labels is None and src.val is None
    assert [p.rsplit("/", 1)[-1] for p in src.skipped] == ["notes.txt"]  # counted, not silently dropped


def test_class_folders_give_labels_and_train_val_split(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            _write_images(tmp_path / split / c, 2 if split == "val" else 4)
    src = data.open_source(str(tmp_path), 16, need_labels=True)
    assert src.train.classes == ["cat", "dog"] and len(src.train) == 8 and len(src.val) == 4
    assert src.train.labels.tolist() == [0] * 4 + [1] * 4
    assert src.train.images.shape == (8, 3, 16, 16)  # small folders are decoded once into memory


def test_unlabelled_folder_for_a_labelled_command_is_an_error(tmp_path):
    _write_images(tmp_path, 2)
    with pytest.raises(DataError, match="class sub-folders"):
        data.open_source(str(tmp_path), 16, need_labels=True)


def test_empty_and_missing_sources_are_errors(tmp_path):
    with pytest.raises(DataError, match="no images"):
        data.open_source(str(tmp_path), 16)
    with pytest.raises(DataError, match="no such folder"):
        data.open_source(str(tmp_path / "nope"), 16)
    (tmp_path / "empty_class").mkdir()
    _write_images(tmp_path / "full_class", 1)
    with pytest.raises(DataError, match="empty_class has no images"):
        data.open_source(str(tmp_path), 16)


def test_torchvision_name_without_download_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=r"not found in .*--download"):
        data.open_source("cifar10", 32, data_dir=str(tmp_path))


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    _write_images(tmp_path, 3)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"not a jpeg at all")
    good = (tmp_path / "img0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    src = data.open_source(str(tmp_path), 16)
    assert len(src.train) == 3
    assert sorted(p.rsplit("/", 1)[-1] for p in src.skipped) == ["garbage.jpg", "truncated.png", "zero.png"]
    with pytest.raises(DataError, match="unreadable image"):  # streamed from workers too
        on_disk = data.open_source(str(tmp_path), 16, cache="none").train
        list(
            data.iterate_batches(
                on_disk, torch.arange(len(on_disk)), 2, torch.device("cpu"), drop_last=False, workers=2, strict=True
            )
        )
    with pytest.raises(DataError, match="unreadable image"):
        data.open_source(str(tmp_path), 16, strict=True, workers=0)


def test_decode_applies_exif_orientation_and_keeps_aspect(tmp_path):
    wide = np.zeros((10, 40, 3), dtype=np.uint8)
    wide[:, :20] = 255  # left half white
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(wide).save(path, exif=exif, quality=100)
    # displayed upright (rotated 90 CW) it is 10 wide, 40 tall with the white half on top;
    # the centre crop then shows white above black (without EXIF: white left of black)
    out = data.decode_file(path, 10).float()
    assert out.shape == (3, 10, 10)
    assert out[:, :4].mean() > 200 and out[:, 6:].mean() < 50
    assert abs(out[:, :, :4].mean() - out[:, :, 6:].mean()) < 30


def test_random_crop_flip_matches_per_image_reference():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    out = data.random_crop_flip(images, padding=2, generator=gen)
    # replay the same draws and crop each image by hand
    gen = torch.Generator().manual_seed(0)
    oy = torch.randint(0, 5, (5,), generator=gen)
    ox = torch.randint(0, 5, (5,), generator=gen)
    flip = torch.rand((5,), generator=gen) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(5):
        ref = padded[i, :, oy[i] : oy[i] + 8, ox[i] : ox[i] + 8]
        if flip[i]:
            ref = ref.flip(2)
        assert torch.equal(out[i], ref)


def test_normalize_uses_mean_and_std():
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = data.normalize(images, (0.5, 0.5, 0.5), (0.5, 0.25, 0.5))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.0, 2.0, 1.0]))


def test_split_is_seeded_and_stratified():
    labels = torch.tensor([0] * 50 + [1] * 30)
    train, val = data.split_indices(80, 0.2, seed=1, labels=labels)
    again = data.split_indices(80, 0.2, seed=1, labels=labels)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert set(train.tolist()).isdisjoint(val.tolist()) and len(train) + len(val) == 80
    assert (labels[val] == 0).sum() == 10 and (labels[val] == 1).sum() == 6


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert torch.equal(data.epoch_order(100, 0, 3), data.epoch_order(100, 0, 3))
    assert not torch.equal(data.epoch_order(100, 0, 3), data.epoch_order(100, 0, 4))


def test_folder_batches_from_workers_match_memory_batches(tmp_path):
    _write_images(tmp_path, 10)
    on_disk = data.open_source(str(tmp_path), 16, cache="none").train
    in_memory = data.open_source(str(tmp_path), 16, cache="ram").train
    order = data.epoch_order(10, 0, 0)
    a = list(data.iterate_batches(on_disk, order, 4, torch.device("cpu"), drop_last=True, workers=2))
    b = list(data.iterate_batches(in_memory, order, 4, torch.device("cpu"), drop_last=True))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images)
