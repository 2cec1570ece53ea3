"""Failures that name what is in the way: a picture over Pillow's size limit, a file where --out needs a folder."""

from __future__ import annotations

from PIL import Image

from rotnet_cli import data as data_lib


def test_the_skipped_warning_names_a_picture_over_pillows_limit(tmp_path, monkeypatch):
    # Pillow refuses a picture over twice MAX_IMAGE_PIXELS (a 14000 x 14000 scan at its default):
    # a small limit makes a 100 x 100 picture one here
    big = tmp_path / "scan.png"
    Image.new("L", (100, 100)).save(big)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)

    line = data_lib.warn_skipped([str(broken), str(big)])

    assert "skipped 2 file(s)" in line
    assert "100 x 100 = 10,000 pixels, over Pillow's limit of 2,000" in line
    assert "shrink it" in line
    assert Image.MAX_IMAGE_PIXELS == 1000  # the limit is put back after reading the size


def test_a_broken_file_gets_no_made_up_reason(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")

    line = data_lib.warn_skipped([str(broken), str(tmp_path / "gone.png")])

    assert line.endswith(f"{broken}, {tmp_path / 'gone.png'}")


def test_an_out_below_a_file_names_the_file_in_the_way(tmp_path):
    from rotnet_cli.atomicfiles import make_dir
    from rotnet_cli.errors import OutputError

    (tmp_path / "afile").write_text("mine")
    try:
        make_dir(tmp_path / "afile" / "sub" / "deeper")
    except OutputError as e:
        assert str(e) == f"{tmp_path / 'afile'} is a file, not a folder; choose another --out"
    else:
        raise AssertionError("a folder was made below a file")
    assert (tmp_path / "afile").read_text() == "mine"
