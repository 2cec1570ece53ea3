"""predict's files (issue 27): --overwrite replaces only what predict wrote, an in-place turn
keeps the owner's file theirs and leaves the folder as it was when it fails or is killed,
several camera folders predict together.

The model's answer is fixed here (every image "rotated by 180 degrees, sure"), so each test
is about the files, not about how well a tiny model sees."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rotnet_cli import prediction
from rotnet_cli.cli import app


@pytest.fixture(autouse=True)
def every_image_upside_down(monkeypatch):
    """The model says 180 degrees, with certainty, for every image (tiny_run's set is 0, 180)."""

    def sure_180(model, images, rotations, *args):
        probs = torch.zeros(len(images), len(rotations))
        probs[:, rotations.index(180)] = 1.0
        return probs, None

    monkeypatch.setattr(prediction, "rotation_probabilities", sure_180)


def png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # grey, like tiny_run's digits: a colour image would have its confidence withheld (unlike the training data)
    grey = np.random.default_rng(seed).integers(0, 256, (12, 20, 1), dtype=np.uint8)
    Image.fromarray(np.repeat(grey, 3, axis=2)).save(path)
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, ["predict", *map(str, args), "--device", "cpu", "--workers", "0"])


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def one_line(result) -> str:
    return " ".join(result.output.split())


# ----------------------------------------------------------------------------- item 1: --overwrite in predict's --out


def test_overwrite_never_replaces_the_users_own_images_or_reports(tiny_run, tmp_path):
    photos = tmp_path / "photos"
    png(photos / "a.png", 1), png(photos / "b.png", 2)
    out = tmp_path / "out"
    png(out / "a.png", 3), png(out / "b.png", 4)
    (out / "predictions.csv").write_text("my own spreadsheet\n")
    before = snapshot(out)

    for extra in ([], ["--copy-unchanged"]):
        result = invoke(tiny_run, photos, "--fix", "--out", out, "--overwrite", *extra)
        assert result.exit_code == 1, result.output
        assert "was not written by rotnet" in one_line(result)
        assert snapshot(out) == before

    (out / "a.png").unlink(), (out / "b.png").unlink()  # the report is still the user's
    result = invoke(tiny_run, photos, "--out", out, "--overwrite")
    assert result.exit_code == 1 and "predictions.csv was not written by rotnet" in one_line(result)


def test_overwrite_replaces_what_predict_wrote_and_nothing_the_user_changed(tiny_run, tmp_path):
    photos = tmp_path / "photos"
    png(photos / "a.png", 1), png(photos / "deep" / "b.png", 2)
    out = tmp_path / "out"
    first = invoke(tiny_run, photos, "--fix", "--out", out)
    assert first.exit_code == 0, first.output
    (out / "notes.txt").write_text("mine")

    again = invoke(tiny_run, photos, "--fix", "--out", out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "deep" / "b.png").is_file()

    png(out / "deep" / "b.png", 9)  # the user edits a copy: from now on it is theirs
    before = snapshot(out)
    refused = invoke(tiny_run, photos, "--fix", "--out", out, "--overwrite")
    assert refused.exit_code == 1 and "b.png was not written by rotnet" in one_line(refused)
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- item 3: owner, group and mode in place


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_in_place_as_root_keeps_the_owner_group_and_mode_of_the_users_file(tiny_run, tmp_path):
    photo = png(tmp_path / "photos" / "a.png")
    os.chown(photo, 1234, 1234)
    os.chmod(photo, 0o640)
    result = invoke(tiny_run, photo, "--fix", "--in-place")
    assert result.exit_code == 0, result.output
    st = photo.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 1234, 0o640)
    assert (tmp_path / "photos" / "a.png.orig").stat().st_uid == 1234


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_in_place_says_so_in_one_line_when_the_owner_cannot_be_kept(tiny_run, tmp_path, monkeypatch):
    photo = png(tmp_path / "a.png")
    os.chown(photo, 1234, 1234)

    def chown_refused(*args, **kwargs):  # what a user who is not root meets
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "chown", chown_refused)
    result = invoke(tiny_run, photo, "--fix", "--in-place")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "owner, group and mode not kept" in line]
    assert len(warnings) == 1 and "1234:1234" in warnings[0], result.stderr


# ----------------------------------------------------------------------------- item 4: failed and killed turns


def test_a_failed_in_place_turn_leaves_the_folder_as_it_was_and_the_next_run_turns_it(tiny_run, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photo = png(photos / "a.png")
    before = snapshot(photos)
    real_replace = os.replace

    def immutable(src, dst, *args, **kwargs):
        if Path(dst) == photo:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", immutable)
    failed = invoke(tiny_run, photo, "--fix", "--in-place", "--json")
    assert failed.exit_code == 0, failed.output
    assert '"not-fixed"' in failed.stdout and "Operation not permitted" in failed.stdout
    assert snapshot(photos) == before  # no a.png.orig, no temp file

    monkeypatch.setattr(os, "replace", real_replace)
    fixed = invoke(tiny_run, photo, "--fix", "--in-place", "--json")
    assert fixed.exit_code == 0 and '"fixed"' in fixed.stdout, fixed.output
    assert (photos / "a.png.orig").read_bytes() != photo.read_bytes()


KILLED_AT_THE_RENAME = """
import os, signal, sys
import torch
from rotnet_cli import prediction
real_replace = os.replace
def killed(src, dst, *a, **k):
    if str(dst).endswith(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **k)
os.replace = killed
def sure_180(model, images, rotations, *args):
    probs = torch.zeros(len(images), len(rotations)); probs[:, rotations.index(180)] = 1.0
    return probs, None
prediction.rotation_probabilities = sure_180
from rotnet_cli.cli import app
sys.argv = ["rotnet", "predict", *sys.argv[1:]]
app()
"""


def kill_at_the_rename(name: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AT": name}
    return subprocess.run(
        [sys.executable, "-c", KILLED_AT_THE_RENAME, *args], capture_output=True, timeout=300, env=env
    )


def test_copies_a_killed_run_wrote_are_still_predicts_to_replace(tiny_run, tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    png(photos / "a.png", 1), png(photos / "b.png", 2)
    args = [str(tiny_run), str(photos), "--fix", "--out", str(out), "--device", "cpu", "--workers", "0"]
    assert kill_at_the_rename("b.png", args).returncode == -9
    assert (out / "a.png").is_file() and not (out / "b.png").exists()

    result = invoke(tiny_run, photos, "--fix", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output

    png(photos / "a.png", 3)  # a new photo under the same name: its copy changes ...
    assert kill_at_the_rename("b.png", [*args, "--overwrite"]).returncode == -9  # ... and the run is killed again
    result = invoke(tiny_run, photos, "--fix", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        ".rotnet-predict.json",
        "a.png",
        "b.png",
        "predictions.csv",
        "predictions.json",
    ]


def test_after_a_killed_run_the_users_own_files_in_out_are_still_never_replaced(tiny_run, tmp_path):
    """A killed run listed the copies it was about to write; a file the user put or edited there
    afterwards is theirs: --overwrite replaces a copy only when it is what predict wrote."""
    photos, out = tmp_path / "photos", tmp_path / "out"
    png(photos / "a.png", 1), png(photos / "b.png", 2), png(photos / "c.png", 3)
    args = [str(tiny_run), str(photos), "--fix", "--out", str(out), "--device", "cpu", "--workers", "0"]
    assert kill_at_the_rename("b.png", args).returncode == -9
    assert (out / "a.png").is_file() and not (out / "b.png").exists()

    for name in ("a.png", "c.png"):  # the user edits the killed run's copy, and puts a file of theirs
        png(out / name, 9)
        before = snapshot(out)
        result = invoke(tiny_run, photos, "--fix", "--out", out, "--overwrite")
        assert result.exit_code == 1 and name in one_line(result), result.output
        assert snapshot(out) == before
        (out / name).unlink()

    result = invoke(tiny_run, photos, "--fix", "--out", out, "--overwrite")  # what predict wrote is still its own
    assert result.exit_code == 0, result.output


def test_a_turn_killed_at_the_worst_moment_is_repaired_by_the_next_run_which_says_so(tiny_run, tmp_path):
    photos = tmp_path / "photos"
    photo = png(photos / "a.png")
    original = photo.read_bytes()
    args = [str(tiny_run), str(photo), "--fix", "--in-place", "--device", "cpu", "--workers", "0"]
    killed = kill_at_the_rename("a.png", args)
    assert killed.returncode == -9, killed.stderr.decode()
    left = sorted(p.name for p in photos.iterdir())
    assert photo.read_bytes() == original and len(left) == 3, left  # a.png, its backup, a temp file

    result = invoke(tiny_run, photo, "--fix", "--in-place")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in photos.iterdir()) == ["a.png", "a.png.orig"]
    assert (photos / "a.png.orig").read_bytes() == original and photo.read_bytes() != original
    assert "interrupted turn" in one_line(result)


def test_a_backup_that_differs_from_the_file_is_still_never_removed(tiny_run, tmp_path):
    photo = png(tmp_path / "a.png")
    (tmp_path / "a.png.orig").write_text("an earlier backup")
    result = invoke(tiny_run, photo, "--fix", "--in-place", "--json")
    assert result.exit_code == 0 and "its backup" in result.stdout
    assert (tmp_path / "a.png.orig").read_text() == "an earlier backup"


# ----------------------------------------------------------------------------- item 11: two camera folders


def test_two_camera_folders_with_the_same_file_names_predict_together(tiny_run, tmp_path):
    a, b = png(tmp_path / "dirA" / "IMG_0001.png", 1), png(tmp_path / "dirB" / "IMG_0001.png", 2)
    result = invoke(tiny_run, a.parent, b.parent, "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout.count('"IMG_0001.png') == 0 and result.stdout.count("IMG_0001.png") >= 2

    out = tmp_path / "out"
    fixed = invoke(tiny_run, a.parent, b.parent, "--fix", "--out", out)
    assert fixed.exit_code == 0, fixed.output
    assert (out / "dirA" / "IMG_0001.png").is_file() and (out / "dirB" / "IMG_0001.png").is_file()


def test_two_folders_of_the_same_name_are_refused_only_when_copies_are_written(tiny_run, tmp_path):
    a, b = png(tmp_path / "one" / "DCIM" / "x.png", 1), png(tmp_path / "two" / "DCIM" / "x.png", 2)
    assert invoke(tiny_run, a.parent, b.parent).exit_code == 0
    refused = invoke(tiny_run, a.parent, b.parent, "--fix", "--out", tmp_path / "out")
    assert refused.exit_code == 1 and "would both be written as" in one_line(refused)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- smaller


def test_a_heic_photo_gets_an_unreadable_row_saying_its_format_is_not_supported(tiny_run, tmp_path):
    png(tmp_path / "photos" / "a.png")
    (tmp_path / "photos" / "IMG_0002.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))
    result = invoke(tiny_run, tmp_path / "photos", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = (tmp_path / "out" / "predictions.csv").read_text()
    assert "IMG_0002.HEIC" in report and "format not supported" in report

    given = invoke(tiny_run, tmp_path / "photos" / "IMG_0002.HEIC", "--json")  # named by itself
    assert given.exit_code == 0 and "format not supported" in given.stdout, given.output
    (tmp_path / "phone").mkdir()
    (tmp_path / "photos" / "IMG_0002.HEIC").rename(tmp_path / "phone" / "IMG_0002.HEIC")
    only = invoke(tiny_run, tmp_path / "phone", "--json")  # a folder of nothing else
    assert only.exit_code == 0 and only.stdout.count("format not supported") == 1, only.output


def test_a_backup_copy_that_fails_halfway_leaves_nothing_behind(tmp_path, monkeypatch):
    """Where hard links fail (another file system, an immutable file) the backup is a copy; a
    copy stopped by a full disk must not stay as a half backup that blocks every later run."""
    import shutil

    from rotnet_cli import upright

    photo = png(tmp_path / "a.png")
    before = snapshot(tmp_path)

    def no_link(*args):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    def half_copy(src, dst, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(shutil, "copy2", half_copy)
    with pytest.raises(upright.DiskFull):
        upright.write_upright(photo, photo, 180, backup=tmp_path / "a.png.orig")
    assert snapshot(tmp_path) == before


def test_in_place_with_the_report_among_the_inputs_says_what_in_place_does(tiny_run, tmp_path):
    png(tmp_path / "photos" / "a.png")
    result = invoke(tiny_run, tmp_path / "photos", "--fix", "--in-place", "--out", tmp_path / "photos")
    assert result.exit_code == 1
    assert "originals are never changed" not in one_line(result)
    assert "--out holds only the report" in one_line(result)


@pytest.mark.parametrize("route", ["reencode", "lossless"])
def test_a_progressive_jpeg_stays_progressive(tiny_run, tmp_path, route):
    if route == "lossless":
        pytest.importorskip("turbojpeg")
    photo = tmp_path / "a.jpg"
    Image.fromarray(np.repeat(np.random.default_rng(0).integers(0, 256, (32, 48, 1), dtype=np.uint8), 3, axis=2)).save(
        photo, progressive=True, quality=90
    )
    out = tmp_path / "out"
    result = invoke(tiny_run, photo, "--fix", "--out", out, "--jpeg", route)
    assert result.exit_code == 0, result.output
    with Image.open(out / "a.jpg") as copy:
        assert copy.info.get("progressive") or copy.info.get("progression")


def test_after_a_full_disk_the_advised_overwrite_run_is_accepted(tiny_run, tmp_path, monkeypatch):
    from rotnet_cli import upright
    from rotnet_cli.errors import OutputError

    photos, out = tmp_path / "photos", tmp_path / "out"
    png(photos / "a.png", 1), png(photos / "b.png", 2)
    real_atomic_write = upright.atomic_write

    def full_at_b(path, write):
        if Path(path).name == "b.png":
            raise OutputError(f"disk full while writing {path}") from OSError(errno.ENOSPC, "No space left")
        return real_atomic_write(path, write)

    monkeypatch.setattr(upright, "atomic_write", full_at_b)
    stopped = invoke(tiny_run, photos, "--fix", "--out", out)
    assert stopped.exit_code == 1 and "run predict again with --overwrite" in one_line(stopped)
    monkeypatch.setattr(upright, "atomic_write", real_atomic_write)
    again = invoke(tiny_run, photos, "--fix", "--out", out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert (out / "b.png").is_file()


# ----------------------------------------------------------------------------- sweep 27f: names predict keeps for itself


@pytest.mark.parametrize("name", ["predictions.csv", "predictions.json", ".rotnet-predict.json"])
def test_an_image_named_like_predicts_report_is_refused_before_its_copy_is_lost(tiny_run, tmp_path, name):
    """A file given by name is taken whatever its ending; its copy would have been replaced by the report."""
    photo = png(tmp_path / "in" / "a.png")
    given = photo.rename(photo.with_name(name))
    out = tmp_path / "out"
    result = invoke(tiny_run, given, "--fix", "--out", out)
    assert result.exit_code == 1 and "rename it" in one_line(result), result.output
    assert not out.exists()
    result = invoke(tiny_run, given, "--out", out)  # without --fix no copy is written: nothing to refuse
    assert result.exit_code == 0, result.output


def test_a_folder_named_like_predicts_report_is_refused_with_fix(tiny_run, tmp_path):
    png(tmp_path / "predictions.json" / "a.png"), png(tmp_path / "b" / "a.png", 2)
    result = invoke(tiny_run, tmp_path / "predictions.json", tmp_path / "b", "--fix", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "rename it" in one_line(result), result.output
    assert not (tmp_path / "out").exists()


def _chattr(flag: str, path: Path) -> bool:
    return (
        subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    )


def test_an_append_only_folder_is_a_one_line_not_fixed_row_and_the_next_run_repairs_it(tiny_run, tmp_path):
    """chattr +a: the backup link and the temp file can be made, but neither the rename nor their
    removal is allowed; the turn is a row saying why, not "a bug in rotnet", and the next run repairs."""
    photos = tmp_path / "photos"
    photo = png(photos / "a.png")
    original = photo.read_bytes()
    if not _chattr("+a", photos):
        pytest.skip("needs root and a file system with chattr +a")
    try:
        result = invoke(tiny_run, photo, "--fix", "--in-place", "--json")
    finally:
        _chattr("-a", photos)
    assert result.exit_code == 0, result.output
    assert "not-fixed" in result.stdout and "Operation not permitted" in result.stdout
    assert photo.read_bytes() == original

    result = invoke(tiny_run, photo, "--fix", "--in-place")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in photos.iterdir()) == ["a.png", "a.png.orig"]
    assert (photos / "a.png.orig").read_bytes() == original and photo.read_bytes() != original


def test_a_folder_and_a_file_of_the_same_name_are_refused_with_a_fix_that_works(tiny_run, tmp_path):
    """One folder is mirrored and a file given by itself keeps its bare name: different folder
    names do not tell them apart, so the message must not advise that."""
    png(tmp_path / "dirA" / "x.png"), png(tmp_path / "dirB" / "x.png", 2)
    result = invoke(tiny_run, tmp_path / "dirA", tmp_path / "dirB" / "x.png", "--fix", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "rename one of them" in one_line(result), result.output
    assert "folders different names" not in one_line(result)


def test_overwrite_never_writes_through_a_link_in_out_into_the_users_photos(tiny_run, tmp_path):
    """The user took predict's upright copy as their photo, then linked the copies' subfolder to
    their photo folder: the file there is byte for byte predict's, but it is their only photo."""
    photos, out = tmp_path / "photos", tmp_path / "out"
    png(photos / "sub" / "x.png")
    assert invoke(tiny_run, photos, "--fix", "--out", out).exit_code == 0
    (photos / "sub" / "x.png").write_bytes((out / "sub" / "x.png").read_bytes())
    shutil.rmtree(out / "sub")
    (out / "sub").symlink_to(photos / "sub")
    before = snapshot(photos)

    result = invoke(tiny_run, photos, "--fix", "--out", out, "--overwrite")
    assert result.exit_code == 1 and "link" in one_line(result), result.output
    assert snapshot(photos) == before
