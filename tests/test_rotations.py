"""The pretext task: labels match the rotations, masks hide corners, one-rotation sampling."""

import pytest
import torch

from rotnet_cli.config import parse_rotations
from rotnet_cli.errors import ConfigError
from rotnet_cli.rotations import disc_mask, make_rotation_batch, rotate_all, rotate_one, rotate_resampled


def _images(n=3, size=8):
    return torch.arange(n * 3 * size * size, dtype=torch.float32).reshape(n, 3, size, size)


def test_all_copies_labels_match_rot90():
    images = _images()
    angles = (0.0, 90.0, 180.0, 270.0)
    copies, labels = rotate_all(images, angles)
    assert copies.shape == (12, 3, 8, 8)
    for j in range(len(copies)):
        r, i = divmod(j, len(images))  # rotation-major layout
        assert labels[j] == r
        assert torch.equal(copies[j], torch.rot90(images[i], k=r, dims=(1, 2)))


def test_label_is_index_in_the_given_order():
    images = _images(2)
    copies, labels = rotate_all(images, (270.0, 0.0))
    assert labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(copies[0], torch.rot90(images[0], k=3, dims=(1, 2)))
    assert torch.equal(copies[2], images[0])


def test_one_copy_per_image_labels_match_rotation():
    images = _images(64)
    angles = (0.0, 90.0, 180.0, 270.0)
    gen = torch.Generator().manual_seed(0)
    out, labels = rotate_one(images, angles, gen)
    assert out.shape == images.shape
    assert set(labels.tolist()) == {0, 1, 2, 3}  # 64 draws cover all four
    for i in range(len(images)):
        k = int(angles[labels[i]] // 90)
        assert torch.equal(out[i], torch.rot90(images[i], k=k, dims=(1, 2)))


def test_one_copy_is_reproducible_from_the_generator():
    images = _images(16)
    a = make_rotation_batch(images, (0.0, 90.0), "one", torch.Generator().manual_seed(3))
    b = make_rotation_batch(images, (0.0, 90.0), "one", torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_resampled_rotation_agrees_with_rot90_direction():
    x = torch.randn(2, 3, 16, 16)
    for angle in (90, 180, 270):
        assert torch.allclose(rotate_resampled(x, angle), torch.rot90(x, angle // 90, dims=(2, 3)), atol=1e-4)


def test_disc_mask_hides_corners_identically_on_every_copy():
    images = torch.ones(2, 3, 32, 32)
    angles = (0.0, 45.0, 90.0, 135.0)
    copies, labels = rotate_all(images, angles)
    mask = disc_mask(32, 32)
    outside = mask[0, 0] == 0
    assert outside.any() and not outside.all()
    # every copy, the 0-degree one included, is zero outside the same disc
    assert (copies[:, :, outside] == 0).all()
    # inside the disc, a constant image stays (almost) constant for every angle: no corner cue
    inner = disc_mask(32, 32)[0, 0].bool() & (
        torch.hypot(*torch.meshgrid(torch.arange(32.0) - 15.5, torch.arange(32.0) - 15.5, indexing="ij")) < 14
    )
    assert torch.allclose(copies[:, :, inner], torch.ones(()), atol=1e-4)


def test_exact_sets_are_not_masked():
    images = torch.ones(1, 3, 8, 8)
    copies, _ = rotate_all(images, (0.0, 180.0))
    assert (copies == 1).all()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("0,90,90", "twice"),
        ("0,abc", "not a number"),
        ("0,360", "outside"),
        ("-90,0", "outside"),
        ("90", "at least two"),
    ],
)
def test_bad_rotation_lists(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_rotations(text)


def test_rotation_list_parsing():
    assert parse_rotations("0, 90,180 ,270") == (0.0, 90.0, 180.0, 270.0)
    assert parse_rotations("0,45") == (0.0, 45.0)
