"""AVIF, which phones and browsers write: where this Pillow decodes it, a folder's .avif files are
images (they were silently passed over), and an upright copy says it was re-encoded, lossy."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rotnet_cli import data
from rotnet_cli.predict_files import UNSUPPORTED_IMAGE_EXTENSIONS, collect_inputs
from rotnet_cli.upright import write_upright

pytestmark = pytest.mark.skipif(not data.AVIF, reason="this Pillow has no AVIF decoder")


def _avif(path, height=40, width=30):
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:10] = 200  # a bright top: which way is up shows
    pixels[:, :5, 1] = 90
    Image.fromarray(pixels).save(path, quality=90)
    return np.asarray(Image.open(path))


def test_a_folders_avif_files_are_images_for_training_and_predict(tmp_path):
    _avif(tmp_path / "phone.avif")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "scan.png")
    assert [p.name for p in data.scan_images(tmp_path)] == ["phone.avif", "scan.png"]
    inputs = {image.path.name: image.supported for image in collect_inputs((str(tmp_path),), writes_copies=False)}
    assert inputs == {"phone.avif": True, "scan.png": True}
    assert ".avif" not in UNSUPPORTED_IMAGE_EXTENSIONS
    assert data.decode_file(tmp_path / "phone.avif", 16).shape == (3, 16, 16)


def test_an_upright_avif_is_turned_and_says_it_was_re_encoded(tmp_path):
    before = _avif(tmp_path / "in.avif")
    note = write_upright(tmp_path / "in.avif", tmp_path / "out.avif", 90)
    after = np.asarray(Image.open(tmp_path / "out.avif"))
    assert note == "re-encoded as AVIF (lossy, quality 95)"  # not "turned losslessly": AVIF is written lossy
    assert after.shape == (30, 40, 3) and np.abs(np.rot90(before, 1).astype(int) - after).mean() < 3
