"""benchmarks/own_folder.py builds the folders the README's own-folder figures come from: they must
keep their promised layout (held-out images turned by exactly k*90 degrees, never trained on)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import own_folder  # noqa: E402


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_faces_and_scans_are_built_with_held_out_images_turned_four_ways(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "own_folder.py"), "--make", str(tmp_path), "--folders", "faces,scans"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "faces" / "train").glob("*.png"))) == 70
    assert len(list((tmp_path / "scans" / "train").glob("*.png"))) == 1000
    held = sorted((tmp_path / "faces" / "held-out").glob("*.png"))
    assert len(held) == 30 * 4
    upright = _pixels(tmp_path / "faces" / "held-out" / "img0000-rot000.png")
    for k in (1, 2, 3):  # the angle in the name is the counter-clockwise turn predict must find
        turned = _pixels(tmp_path / "faces" / "held-out" / f"img0000-rot{90 * k:03d}.png")
        assert np.array_equal(turned, np.rot90(upright, k))
    trained = {_pixels(p).tobytes() for p in (tmp_path / "faces" / "train").glob("*.png")}
    assert upright.tobytes() not in trained


def _stamp(path: Path, colour: tuple[int, int, int], tall: bool) -> None:
    """A cut-out on a transparent background, like Tux Paint's stamps."""
    image = np.zeros((80, 60, 4), dtype=np.uint8)
    image[5:75, 20:40] = (*colour, 255) if tall else (0, 0, 0, 0)
    image[30:50, 5:55] = (*colour, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def test_objects_hold_out_whole_subjects_and_leave_symbols_out(tmp_path):
    stamps = tmp_path / "stamps"
    for i, subject in enumerate(("cat", "dog", "tree", "car", "boat")):
        _stamp(stamps / "things" / f"{subject}.png", (40 * i, 90, 200), tall=True)
        _stamp(stamps / "things" / f"{subject}-2_mirror.png", (40 * i, 90, 200), tall=False)  # same subject, colour
    _stamp(stamps / "symbols" / "letter-a.png", (10, 10, 10), tall=True)  # left out: no up to learn
    own_folder.make_objects(tmp_path / "objects", held=2, stamps=str(stamps))
    train = [_pixels(p) for p in sorted((tmp_path / "objects" / "train").glob("*.png"))]
    held = [_pixels(p) for p in sorted((tmp_path / "objects" / "held-out").glob("*-rot000.png"))]
    assert len(held) == 2 and len(train) == 8  # 5 subjects x 2 stamps, one subject (2 stamps) held out
    assert all(image.shape[2] == 3 and (image[0, 0] == 255).all() for image in train + held)  # on white

    # both stamps of the held-out subject are held out: same colour family, none of it trained on
    def centre(image):
        return tuple(image[image.shape[0] // 2, image.shape[1] // 2])

    assert {centre(h) for h in held}.isdisjoint({centre(t) for t in train})


def test_objects_without_the_stamps_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(own_folder, "STAMPS", (str(tmp_path / "nowhere"),))
    monkeypatch.delenv("TUXPAINT_STAMPS", raising=False)
    with pytest.raises(SystemExit, match="apt-get install --no-install-recommends tuxpaint-stamps-default"):
        own_folder.make_objects(tmp_path / "objects")
