"""Dataset sources, uint8 batches, and the on-device transforms.

Everything leaves this module as uint8 (N, 3, S, S) batches: decoding and resizing happen
once (small datasets are decoded a single time into memory) or in loader workers (large
folders), and conversion, normalisation and augmentation happen on the training device,
batched. Nothing about rotation lives here (see rotations.py).

Sources: ``digits`` (built in), a folder of class sub-folders, a flat folder of images
(recursive), a folder with ``train/`` and ``val/``, and torchvision dataset names.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import math
import os
import stat
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from . import stopping
from .errors import DataError
from .events import Decoding, Progress, ignore

# AVIF (phones and browsers write it): Pillow decodes it from 11.2 on, in builds with its _avif module;
# older builds leave it to predict's "format not supported" rows (predict_files.UNSUPPORTED_IMAGE_EXTENSIONS)
AVIF = (".avif",) if importlib.util.find_spec("PIL._avif") is not None else ()
# torchvision's, GIF (PIL reads it, torchvision's list leaves it out) and AVIF where this Pillow reads it
IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".gif", *AVIF)
TORCHVISION_DATASETS = ("cifar10", "cifar100", "stl10", "mnist", "fashionmnist", "svhn")
BUILTIN_DIGITS = Path(__file__).parent / "data" / "digits.npz"
DEFAULT_DATA_DIR = Path(os.environ.get("ROTNET_DATA_DIR", Path.home() / ".cache" / "rotnet" / "datasets"))
# In-memory caching of a folder is automatic below this many bytes of decoded uint8 pixels.
AUTO_RAM_CACHE_BYTES = 2 * 2**30


@dataclass(frozen=True, eq=False)
class ImageSet:
    """One split of a dataset: decoded in memory (``images``) or files on disk (``paths``).

    Immutable: ``subset`` and ``to`` make new sets. Files that turn out unreadable while
    batches are read are reported by those batches (Batch.skipped), not kept here.
    """

    name: str
    img_size: int
    images: torch.Tensor | None = None  # (N, 3, S, S) uint8, when in memory
    paths: list[Path] | None = None  # when read from disk
    labels: torch.Tensor | None = None  # (N,) int64, None when unlabelled
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.paths or [])

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def subset(self, indices: torch.Tensor | list[int]) -> ImageSet:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return dataclasses.replace(
            self,
            images=self.images[idx] if self.images is not None else None,
            paths=[self.paths[i] for i in idx.tolist()] if self.paths is not None else None,
            labels=self.labels[idx] if self.labels is not None else None,
        )

    def to(self, device: torch.device) -> ImageSet:
        """The same set with its decoded images on ``device`` (files stay files)."""
        return dataclasses.replace(self, images=self.images.to(device)) if self.images is not None else self


@dataclass(frozen=True)
class DataSource:
    """A resolved ``--data``: a training split, a validation split when the source has one,
    and the files left out while opening it (not images, or unreadable), each once."""

    train: ImageSet
    val: ImageSet | None = None
    skipped: tuple[str, ...] = ()
    files: int = 0  # image files found, before decoding (a resume compares it: unreadable ones included)
    names: str | None = None  # a digest of their names below --data (files_digest): a resume compares it too


# ----------------------------------------------------------------------------- resolving --data


def _dataset_key(spec: str) -> str:
    """'CIFAR-10', 'cifar_10' -> 'cifar10': how built-in and torchvision names are matched."""
    return spec.lower().replace("-", "").replace("_", "")


def dataset_key(spec: str) -> str | None:
    """The built-in or torchvision dataset ``spec`` names ('digits', 'cifar10', ...), None for a folder."""
    key = _dataset_key(spec)
    return key if key == "digits" or (key in TORCHVISION_DATASETS and not Path(spec).exists()) else None


# What an export's model card and config say about the training data: the source as its authors
# name it, and its licence where the source states one (a folder's licence is its owner's to say).
DATA_PROVENANCE = {
    "digits": (
        "UCI Optical Recognition of Handwritten Digits, test set (E. Alpaydin, C. Kaynak, 1998), "
        "as distributed with scikit-learn",
        "CC BY 4.0",
    ),
}


def data_provenance(spec: str) -> tuple[str, str | None]:
    """(what --data ``spec`` is, its licence or None where rotnet does not know it)."""
    return DATA_PROVENANCE.get(_dataset_key(spec), (spec, None))


def native_size(spec: str) -> int | None:
    """The image size of a built-in or torchvision source (None for folders)."""
    key = _dataset_key(spec)
    return {"digits": 32, "cifar10": 32, "cifar100": 32, "mnist": 32, "fashionmnist": 32, "svhn": 32, "stl10": 96}.get(
        key
    )


# What the built-in and torchvision datasets hold: (pixels on a side, grey). predict warns
# when the images it is given differ clearly from the data its weights were trained on.
DATASET_IMAGES = {
    "digits": (8, True),
    "mnist": (28, True),
    "fashionmnist": (28, True),
    "cifar10": (32, False),
    "cifar100": (32, False),
    "svhn": (32, False),
    "stl10": (96, False),
}


def dataset_images(spec: str | None) -> tuple[int, bool] | None:
    """(pixels on a side, grey) of a built-in or torchvision dataset name; None for folders and unknown names."""
    return DATASET_IMAGES.get(_dataset_key(spec)) if isinstance(spec, str) else None


def open_source(
    spec: str,
    img_size: int,
    *,
    need_labels: bool = False,
    download: bool = False,
    data_dir: str | Path | None = None,
    cache: str = "auto",
    workers: int = 2,
    strict: bool = False,
    progress: Progress | None = None,
    option: str = "--data",
) -> DataSource:
    """Resolve ``--data`` into train (and maybe val) ImageSets of uint8 at ``img_size``; ``option``:
    how the command calls its data in messages (--data, --val-data, DATA)."""
    key = _dataset_key(spec)
    if key == "digits":
        digits = _digits(img_size)
        return DataSource(digits, files=len(digits))
    if key in TORCHVISION_DATASETS and not Path(spec).exists():
        root = Path(data_dir) if data_dir else DEFAULT_DATA_DIR / key
        train = _torchvision(key, root, "train", img_size, download)
        val = _torchvision(key, root, "test", img_size, download)
        return DataSource(train, val, files=len(train) + len(val))
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"{option} {spec}: no such folder, and not a known dataset name (digits, {', '.join(TORCHVISION_DATASETS)})"
        )
    if not path.is_dir():
        raise DataError(f"{option} {spec} is a file; give a folder of images (or of class sub-folders)")
    load = dict(
        img_size=img_size,
        need_labels=need_labels,
        cache=cache,
        workers=workers,
        strict=strict,
        progress=progress or ignore,
    )
    if (path / "train").is_dir() and (path / "val").is_dir():
        (train, train_skipped, train_found), (val, val_skipped, val_found) = (
            _folder(path / "train", **load),
            _folder(path / "val", **load),
        )
        found = train_found + val_found
        return DataSource(train, val, tuple(train_skipped + val_skipped), len(found), files_digest(found, path))
    train, skipped, found = _folder(path, **load)
    return DataSource(train, None, tuple(skipped), len(found), files_digest(found, path))


def files_digest(paths: list[Path], root: Path) -> str:
    """A digest of the image files' names below ``root`` (sorted): a folder whose files were swapped for
    as many others has another one, while the same folder moved elsewhere keeps it."""

    def name(path: Path) -> str:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:  # not below root as written (a link followed elsewhere): its whole path
            return path.as_posix()

    digest = hashlib.sha256()
    for each in sorted(map(name, paths)):
        digest.update(each.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def _digits(img_size: int) -> ImageSet:
    """The built-in UCI digits (1,797 8x8 grey images): upsampled, grey replicated to RGB."""
    with np.load(BUILTIN_DIGITS) as d:
        images = torch.from_numpy(d["images"]).unsqueeze(1)  # (N, 1, 8, 8) uint8
        labels = torch.from_numpy(d["labels"].astype(np.int64))
    images = resize_uint8(images, img_size).expand(-1, 3, -1, -1).contiguous()
    return ImageSet("digits", img_size, images=images, labels=labels, classes=[str(i) for i in range(10)])


def _torchvision(key: str, root: Path, split: str, img_size: int, download: bool) -> ImageSet:
    """A torchvision dataset's arrays straight into uint8 tensors (no per-image PIL)."""
    import torchvision.datasets as tvd

    train = split == "train"
    makers = {
        "cifar10": lambda: tvd.CIFAR10(str(root), train=train, download=download),
        "cifar100": lambda: tvd.CIFAR100(str(root), train=train, download=download),
        "mnist": lambda: tvd.MNIST(str(root), train=train, download=download),
        "fashionmnist": lambda: tvd.FashionMNIST(str(root), train=train, download=download),
        "svhn": lambda: tvd.SVHN(str(root), split="train" if train else "test", download=download),
        "stl10": lambda: tvd.STL10(str(root), split="train" if train else "test", download=download),
    }
    try:
        ds = makers[key]()
    except RuntimeError as e:
        if download:
            raise DataError(f"could not download {key} into {root}: {str(e).splitlines()[0]}") from e
        raise DataError(
            f"{key} was not found in {root}; pass --download to fetch it there, or --data-dir FOLDER where it already lies"
        ) from None
    except OSError as e:
        raise DataError(f"could not download {key} into {root} (offline?): {str(e).splitlines()[0]}") from e
    data = ds.data
    data = torch.as_tensor(np.asarray(data))
    if data.ndim == 3:  # (N, H, W) grey
        data = data.unsqueeze(1)
    elif data.shape[-1] in (1, 3):  # (N, H, W, C) -> (N, C, H, W)
        data = data.permute(0, 3, 1, 2)
    images = resize_uint8(data.contiguous(), img_size)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1).contiguous()
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = getattr(ds, "labels", None)
    labels = torch.as_tensor(np.asarray(targets), dtype=torch.long) if targets is not None else None
    classes = list(getattr(ds, "classes", [])) or None
    return ImageSet(key, img_size, images=images, labels=labels, classes=classes)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize a (N, C, H, W) uint8 batch to (N, C, size, size): bilinear, antialiased when shrinking."""
    if images.shape[-2:] == (size, size):
        return images
    out = []
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size))


def scan_images(folder: Path) -> list[Path]:
    """Every image file below ``folder`` (recursive), sorted so the order is reproducible."""
    return _scan(folder)[0]


def _scan(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) below ``folder``, recursive and sorted.

    One walk of our own rather than torchvision's make_dataset: it also finds loose images
    (a flat folder has no classes) and the files that are not images, which are counted as
    skipped instead of silently dropped. One rule for hidden entries: a hidden file, and
    everything in a hidden folder (.git, .thumbnails, macOS's ._ files), is not data and not
    counted. Links are followed (a folder seen twice, a loop, is walked once); a broken or
    looping link is the file it is named like, unreadable: counted with the others, and an
    image one is an error with --strict-data. A fifo or device named like an image is not one.
    """
    images, others = [], []
    walked: set[tuple[int, int]] = set()
    for root, folders, files in os.walk(folder, followlinks=True):
        try:
            here = os.stat(root)
        except OSError:
            folders[:] = []
            continue
        if (here.st_dev, here.st_ino) in walked:  # a link back to a folder already walked
            folders[:] = []
            continue
        walked.add((here.st_dev, here.st_ino))
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = Path(root) / name
                image = has_file_allowed_extension(name, IMAGE_EXTENSIONS) and not special_file(path)
                (images if image else others).append(path)
    return sorted(images), sorted(others)


def special_file(path: Path) -> bool:
    """A fifo, socket or device under an image's name: reading it could block forever, so it is no image
    (a broken link is not special: it is an unreadable image, counted as such)."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def image_inputs(specs: tuple[str, ...] | list[str]) -> list[tuple[Path, Path]]:
    """Image files given on a command line, and folders of them (recursive), in the given order.

    -> (path, path relative to the folder it was found in, or its bare name); each file once.
    A missing path or a folder without images is a DataError.
    """
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for spec in specs:
        root = Path(spec).expanduser()
        if not os.path.lexists(root):  # a broken or looping link is a file: unreadable, as in a folder
            raise DataError(f"{spec} does not exist; give image files or folders of images")
        if root.is_dir():
            pairs = [(p, p.relative_to(root)) for p in scan_images(root)]
            if not pairs:
                raise DataError(
                    f"{spec} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively); "
                    "give image files or a folder that holds some"
                )
        else:
            pairs = [(root, Path(root.name))]
        for path, relative in pairs:
            # realpath, not Path.resolve: a link to itself (a.png -> a.png) resolves to where the loop
            # starts rather than raising RuntimeError; it is then an unreadable image like any broken link
            real = Path(os.path.realpath(path))
            if real not in seen:
                seen.add(real)
                found.append((path, relative))
    return found


def _class_layout(folder: Path, image_paths: list[Path]) -> tuple[list[str], list[Path], list[int]] | None:
    """(classes, paths, labels) when ``folder`` holds only class sub-folders, else None."""
    subdirs = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    by_class: dict[str, list[Path]] = {name: [] for name in subdirs}
    for p in image_paths:
        parts = p.relative_to(folder).parts
        if len(parts) == 1:  # a loose image: this is a flat folder
            return None
        by_class.setdefault(parts[0], []).append(p)
    if not subdirs:
        return None
    classes, paths, labels = [], [], []
    for label, name in enumerate(subdirs):
        if not by_class[name]:
            raise DataError(
                f"class folder {folder / name} has no images; remove it or add images (extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        classes.append(name)
        paths += by_class[name]
        labels += [label] * len(by_class[name])
    return classes, paths, labels


def _no_images_fix(folder: Path) -> str:
    """What to do about a folder without images: a train/ or val/ split folder has its own way out."""
    if folder.name in ("train", "val") and (folder.parent / "train").is_dir() and (folder.parent / "val").is_dir():
        other = "val" if folder.name == "train" else "train"
        return (
            f"add images to it, or remove the empty {folder.name}/ and give {folder.parent / other} as --data "
            "(a folder without train/ and val/ is split by --val-split)"
        )
    return "add images to it or give another folder"


def _folder(
    folder: Path,
    img_size: int,
    need_labels: bool,
    cache: str,
    workers: int,
    strict: bool,
    progress: Progress,
) -> tuple[ImageSet, list[str], list[Path]]:
    """The images below ``folder`` (labelled when it holds class sub-folders), the files left out,
    and the image files found (readable or not)."""
    paths, non_images = _scan(folder)
    layout = _class_layout(folder, paths)
    if layout is None:
        if need_labels:
            raise DataError(
                f"{folder} has no class sub-folders, so it has no labels; arrange it as {folder}/CLASS/image.jpg"
            )
        classes, labels = None, None
    else:
        classes, paths, label_list = layout
        labels = torch.tensor(label_list, dtype=torch.long)
    if not paths:
        raise DataError(
            f"{folder} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively); "
            + _no_images_fix(folder)
        )
    images = ImageSet(folder.name, img_size, paths=paths, labels=labels, classes=classes)
    skipped = [str(p) for p in non_images]  # files that are not images are skipped and counted, like unreadable ones
    decoded_bytes = len(paths) * 3 * img_size * img_size
    if cache in ("ram", "device") or (cache == "auto" and decoded_bytes <= AUTO_RAM_CACHE_BYTES):
        images, unreadable = decode_all(images, workers=workers, strict=strict, progress=progress)
        skipped += unreadable
    return images, skipped, list(paths)


# ----------------------------------------------------------------------------- decoding files


def decode_file(path: Path, size: int) -> torch.Tensor:
    """One image file -> (3, size, size) uint8: EXIF orientation applied, RGB, shorter side
    resized to ``size`` (antialiased), centre crop. Raises on unreadable files."""
    from PIL import Image, ImageOps

    if special_file(path):  # given by name (a folder scan skips them): opening a fifo blocks until a writer comes
        raise OSError(f"{path} is not a regular file (a fifo, socket or device)")
    with Image.open(path) as im:
        # JPEG draft mode decodes at a reduced scale directly: much cheaper for big photos.
        im.draft("RGB", (size * 2, size * 2))
        fmt = im.format
        im = to_rgb(ImageOps.exif_transpose(im), fmt)
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR, reducing_gap=None)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        array = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class UnsupportedPixels(ValueError):
    """An image whose pixel values have no known scale (counted with the unreadable files)."""


def to_rgb(image, fmt: str | None):
    """A PIL image of any mode as 8-bit RGB at its true brightness.

    PIL's own conversion clips 16-bit and 32-bit greys to 255 (a 16-bit PNG turns white) and
    float images to their integer part (a float TIFF in [0, 1] turns black). Those are scaled
    here: 16 bits (I;16*, and PNG's "I", which holds 16-bit greys) by 255/65535; floats in
    [0, 1] by 255. Integers and floats of any other range have no known scale: UnsupportedPixels.
    """
    from PIL import Image

    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and fmt == "PNG"):
        grey = np.asarray(image).astype(np.float32) / 257.0  # 65535 -> 255
    elif mode == "F":
        grey = np.asarray(image, dtype=np.float32)
        if not np.isfinite(grey).all() or grey.min() < 0 or grey.max() > 1:
            raise UnsupportedPixels("float pixels outside [0, 1]: their scale is unknown")
        grey = grey * 255.0
    elif mode == "I":
        raise UnsupportedPixels("32-bit integer pixels: their scale is unknown")
    else:
        return image.convert("RGB")
    return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L").convert("RGB")


class FileDataset(torch.utils.data.Dataset):
    """Decodes files in loader workers; an unreadable file yields None (counted, skipped).

    Errors are not raised here: raised in a worker they would reach the user wrapped in
    the worker's traceback. The main process decides (skip, or --strict-data's error).
    """

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, decode_file(self.paths[index], self.size)
        except Exception:  # PIL raises many types for broken files
            return index, None


def _none_readable(paths: list[Path]) -> DataError:
    where = Path(paths[0]).parent
    return DataError(
        f"none of the {len(paths)} image files in {where} could be read (e.g. {paths[0]}); "
        "replace the broken files with readable images, or remove them"
    )


def _strict_error(path) -> DataError:
    return DataError(f"unreadable image {path}; remove it or drop --strict-data")


def _collate(items):
    """-> (indices (n,), images (n, 3, S, S) uint8, bad_indices list) with failed reads left out."""
    good = [(i, x) for i, x in items if x is not None]
    bad = [i for i, x in items if x is None]
    if not good:
        return torch.empty(0, dtype=torch.long), None, bad
    idx = torch.tensor([i for i, _ in good], dtype=torch.long)
    # default_collate stacks into shared memory inside a worker, so that a failure there (a full
    # /dev/shm, a file-size limit) is raised and handed to the main process; a plain torch.stack is
    # moved to shared memory later by the queue's feeder thread, whose errors are lost: the loader
    # then waits forever for a batch that never comes
    return idx, torch.utils.data.default_collate([x for _, x in good]), bad


def _from_workers(loader: torch.utils.data.DataLoader) -> Iterator:
    """The loader's batches; a worker that cannot hand a batch over through shared memory is one line."""
    try:
        yield from loader
    except RuntimeError as e:
        if "</torch_" not in str(e):  # torch's shared-memory files are named so; anything else is a bug
            raise
        reason = str(e).strip().splitlines()[-1]
        raise DataError(
            f"the image loader's worker processes could not pass images through shared memory ({reason}); "
            "free space in /dev/shm (or raise the file-size limit), or run with -j 0"
        ) from e


def check_readable(images: ImageSet, strict: bool = False) -> None:
    """A streamed set is decoded while training: before anything is written, make sure that
    at least one of its files decodes (usually the first: one decode)."""
    assert images.paths is not None
    for path in images.paths:
        try:
            decode_file(path, images.img_size)
            return
        except Exception:  # PIL raises many types for broken files
            if strict:
                raise _strict_error(path) from None
    raise _none_readable(images.paths)


def decode_all(
    images: ImageSet, workers: int = 2, strict: bool = False, progress: Progress = ignore
) -> tuple[ImageSet, list[str]]:
    """Decode every file once into memory -> (in-memory ImageSet, the unreadable files left out)."""
    assert images.paths is not None
    loader = torch.utils.data.DataLoader(
        FileDataset(images.paths, images.img_size),
        batch_size=64,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=stopping.loader_worker,
    )
    out = torch.empty((len(images.paths), 3, images.img_size, images.img_size), dtype=torch.uint8)
    ok = torch.zeros(len(images.paths), dtype=torch.bool)
    bad: list[int] = []
    done = 0
    progress(Decoding(0, len(images.paths)))  # before the workers' first batch, which can take a while
    for idx, batch, failed in _from_workers(loader):
        if strict and failed:  # raised here, not in a worker, whose errors arrive wrapped in a traceback
            raise _strict_error(images.paths[failed[0]])
        if batch is not None:
            out[idx] = batch
            ok[idx] = True
        bad += failed
        done += len(idx) + len(failed)
        progress(Decoding(done, len(images.paths)))
    keep = ok.nonzero().squeeze(1)
    if len(keep) == 0:
        raise _none_readable(images.paths)
    decoded = dataclasses.replace(
        images,
        images=out[keep],
        paths=[images.paths[i] for i in keep.tolist()],
        labels=images.labels[keep] if images.labels is not None else None,
    )
    return decoded, [str(images.paths[i]) for i in sorted(bad)]


# ----------------------------------------------------------------------------- splits and batches


def split_indices(
    n: int, fraction: float, seed: int, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) index tensors; seeded; stratified by class when labels are given."""
    g = torch.Generator().manual_seed(seed)
    if fraction <= 0:
        return torch.arange(n), torch.empty(0, dtype=torch.long)
    if labels is None:
        perm = torch.randperm(n, generator=g)
        k = max(1, round(n * fraction))
        return perm[k:].sort().values, perm[:k].sort().values
    train, val = [], []
    for c in labels.unique(sorted=True).tolist():
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=g)]
        k = max(1, round(len(members) * fraction)) if len(members) > 1 else 0
        val.append(members[:k])
        train.append(members[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of one epoch, a pure function of (seed, epoch): resume replays it exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


@dataclass
class Batch:
    images: torch.Tensor  # (n, 3, S, S) uint8 on the target device
    labels: torch.Tensor | None  # (n,) int64 on the target device
    skipped: list[str]  # files that failed to decode in this batch (and in batches before it with nothing readable)
    indices: torch.Tensor | None = None  # (n,) int64 on the host: where these images are in the ImageSet
    index: int = 0  # the batch's number in the order (a batch with nothing readable is not yielded: a gap)


def iterate_batches(
    images: ImageSet,
    order: torch.Tensor,
    batch_size: int,
    device: torch.device,
    *,
    drop_last: bool,
    workers: int = 2,
    start_batch: int = 0,
    strict: bool = False,
    with_labels: bool = True,
) -> Iterator[Batch]:
    """uint8 batches in ``order`` on ``device``, from ``start_batch`` on (mid-epoch resume).

    ``with_labels=False`` leaves the class labels behind (pretraining makes its own): one
    copy less per step, and a copy from unpinned memory can wait for the GPU.

    In-memory sets are indexed directly (on the device if cached there); files are decoded
    by DataLoader workers into pinned memory. The next batch is copied while the current
    one trains (non_blocking transfers from pinned memory). Unreadable files are left out and
    named in ``Batch.skipped``; a batch without one readable image is not yielded, so its
    files are named by the batch before or after it.
    """
    n_batches = num_batches(len(order), batch_size, drop_last)
    batch_rows = [slice(i * batch_size, (i + 1) * batch_size) for i in range(start_batch, n_batches)]  # into order
    pin = device.type == "cuda"
    labels = images.labels if with_labels else None

    def to_device(x: torch.Tensor) -> torch.Tensor:
        if x.device == device:
            return x
        return (x.pin_memory() if pin else x).to(device, non_blocking=pin)

    if images.in_memory:
        assert images.images is not None
        # the order goes to the images' device once: a copy per batch would wait for the GPU every step
        order_there = order.to(images.images.device)
        for index, rows in enumerate(batch_rows, start=start_batch):
            yield Batch(
                to_device(images.images[order_there[rows]]),
                to_device(labels[order[rows]]) if labels is not None else None,
                [],
                indices=order[rows],
                index=index,
            )
        return

    assert images.paths is not None
    loader, sampler = _file_loader(images, workers, pin)
    sampler.batches = [order[rows].tolist() for rows in batch_rows]
    held: Batch | None = None  # one batch behind the loader, so that it can name the unreadable files after it
    pending: list[str] = []  # unreadable files of batches with nothing readable, before any batch was held
    for index, (idx, batch, failed) in enumerate(
        _from_workers(loader), start=start_batch
    ):  # in order: the k-th batch of the sampler
        if strict and failed:
            raise _strict_error(images.paths[failed[0]])
        skipped = [str(images.paths[i]) for i in failed]
        if batch is None:  # every file of this batch was unreadable
            (held.skipped if held is not None else pending).extend(skipped)
            continue
        if held is not None:
            yield held
        held = Batch(
            batch.to(device, non_blocking=pin),
            to_device(labels[idx]) if labels is not None else None,
            pending + skipped,
            indices=idx,
            index=index,
        )
        pending = []
    if held is not None:
        yield held


class _EpochBatches(torch.utils.data.Sampler):
    """A batch sampler whose batches are set anew for every epoch (and resume point)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _file_loader(images: ImageSet, workers: int, pin: bool) -> tuple[torch.utils.data.DataLoader, _EpochBatches]:
    """One DataLoader per image set, its workers kept alive across epochs.

    Starting worker processes every epoch costs seconds that the model then waits for;
    with persistent workers the next epoch only swaps the batches they are handed.
    """
    key = (workers, pin)
    cached = _LOADERS.get(images)
    if cached is None or cached[0] != key:
        sampler = _EpochBatches()
        loader = torch.utils.data.DataLoader(
            FileDataset(images.paths, images.img_size),
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=pin,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=stopping.loader_worker,
        )
        cached = _LOADERS[images] = (key, loader, sampler)
    return cached[1], cached[2]


# ImageSet -> (settings, DataLoader, batch sampler): the workers of a set's files, kept while the set lives
_LOADERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


# ----------------------------------------------------------------------------- on-device transforms


def crop_padding(augment: str, img_size: int) -> int:
    """Pixels of zero padding before the random crop: ``crop`` and ``crop+flip`` pad 1/8 of the side (the
    paper's 4 px at 32 px); ``shift`` pads 1/16 (2 px at 32 px), a smaller move that leaves a character
    that fills its frame whole. Measured on the digits demo (resnet18, 10 epochs, batch 32): shift 0.953
    val rotation accuracy and probe features above random weights on 4 of 4 label draws; crop 0.939;
    none 0.947 and below random on 1 draw (docs/own-folder.md)."""
    if augment == "none":
        return 0
    return max(1, img_size // (16 if augment == "shift" else 8))


def random_crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator | None, flip: bool = True
) -> torch.Tensor:
    """Per-image random crop after zero padding, and (``flip``) a random horizontal flip; one gather.

    images: (N, C, S, S) uint8 -> (N, C, S, S) uint8. The same as torchvision's
    RandomCrop(S, padding) + RandomHorizontalFlip on each image, without a Python loop.
    Crop and flip are both folded into the row and column indices of a single gather:
    on a GPU every kernel launch counts when the model step itself is small.
    """
    n, _, h, w = images.shape
    dev = images.device
    oy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=dev)
    ox = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=dev)
    batch, rows, cols, cols_reversed = _crop_grid(n, h, w, dev)
    rows = oy + rows  # (N, S): the padded rows each image keeps
    if flip:
        flipped = torch.rand((n, 1), generator=generator, device=dev) < 0.5
        cols = torch.where(flipped, cols_reversed, cols)  # (N, S): a flipped image reads its columns backwards
    cols = ox + cols
    padded = F.pad(images, (padding, padding, padding, padding)) if padding > 0 else images  # zeros, as RandomCrop
    # advanced indexing around the channel slice gives (N, S, S, C)
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


@functools.lru_cache(maxsize=16)
def _crop_grid(n: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Index tensors of a crop, made once per shape and device (read-only, shared)."""
    batch = torch.arange(n, device=device)[:, None, None]  # (N, 1, 1)
    rows = torch.arange(h, device=device)[None]  # (1, H)
    cols = torch.arange(w, device=device)[None]  # (1, W)
    return batch, rows, cols, cols.flip(1)


# --augment auto where the pixels cannot tell: SVHN is colour photos, but of house numbers,
# and a mirrored digit is no digit (its digits sit in a wider view: a crop leaves them whole).
# Every other source is decided by its pixels (below).
AUTO_SAMPLE = (256, 32)  # images looked at to decide: in memory, and decoded from files (slower)


def auto_augment(spec: str, images: ImageSet) -> tuple[str, str]:
    """What ``--augment auto`` means for this data -> (choice, why), decided by what the images are
    (planning.plan_augment: scans and digits shift, other grey images crop, colour photos crop+flip)."""
    from .planning import measure_content, plan_augment

    sample = sample_images(images)
    decision = plan_augment("auto", measure_content(sample) if sample is not None else None, dataset_key(spec))
    return decision.value, decision.why


def sample_images(images: ImageSet) -> torch.Tensor | None:
    """A few evenly spaced images, uint8 (n, 3, S, S), to decide by; None when none of them decodes.
    Files are decoded at S = min(the set's size, planning.CONTENT_SIZE): 32 of them at --img-size 8192
    would be 6 GB of pixels to say whether they are grey."""
    from .planning import CONTENT_SIZE

    in_memory, from_files = AUTO_SAMPLE
    if images.in_memory:
        return images.images[_evenly_spaced(len(images), in_memory).to(images.images.device)].cpu()
    # an unreadable file gives None, as in training
    files = FileDataset(images.paths, min(images.img_size, CONTENT_SIZE))
    decoded = [x for _, x in (files[i] for i in _evenly_spaced(len(images), from_files).tolist()) if x is not None]
    return torch.stack(decoded) if decoded else None


SIZE_SAMPLE = 256  # image files whose headers are read to plan the image size


def image_sides(spec: str) -> list[int] | None:
    """The shorter side, in pixels, of up to SIZE_SAMPLE evenly spaced image files of a folder
    (only their headers are read); None for a dataset name or a path that is not a folder
    (opening the data says what is wrong), [] when no header reads."""
    path = Path(spec).expanduser()
    if _dataset_key(spec) == "digits" or not path.is_dir():
        return None
    if (path / "train").is_dir() and (path / "val").is_dir():
        path = path / "train"
    paths = scan_images(path)
    # unreadable files are skipped (and counted) when the data is decoded
    sides = [header_side(paths[i]) for i in (_evenly_spaced(len(paths), SIZE_SAMPLE).tolist() if paths else [])]
    return [side for side in sides if side is not None]


def header_side(path: Path) -> int | None:
    """The shorter side of an image file, read from its header only; None when it cannot be read."""
    from PIL import Image

    if special_file(path):  # a fifo given by name: opening it would block
        return None
    try:
        with Image.open(path) as image:
            return min(image.size)
    except Exception:  # any decoder's own error: the file is unreadable here, as when it is decoded
        return None


def _evenly_spaced(n: int, k: int) -> torch.Tensor:
    return torch.linspace(0, n - 1, min(n, k)).round().long().unique()


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> float32 normalised with the model's mean and std:
    (x - mean) / std computed as x * (1 / std) - mean / std, one fused kernel after the cast."""
    scale, shift = _pixel_stats(tuple(mean), tuple(std), images.device)
    return torch.addcmul(shift, images.float(), scale)


@functools.lru_cache(maxsize=16)
def _pixel_stats(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / std, -mean / std) for 0..255 pixels as (1, C, 1, 1) tensors on ``device``, made once:
    building them from Python numbers on a GPU is a copy that waits for the GPU (a sync every step)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
    return (1 / s).to(device), (-m / s).to(device)


def warn_skipped(skipped: list[str]) -> str | None:
    """The one-line warning about unreadable files (None when there were none); a picture Pillow
    refuses for its size (over twice its decompression-bomb limit: a 14000 x 14000 scan) says so,
    since nothing else about it is broken."""
    if not skipped:
        return None
    first = ", ".join(skipped[:3])
    more = " ..." if len(skipped) > 3 else ""
    oversized = next((f" ({path}: {why})" for path in skipped[:3] if (why := too_many_pixels(path))), "")
    return f"skipped {len(skipped)} file(s) that are not readable images: {first}{more}{oversized}"


def too_many_pixels(path: str | Path) -> str | None:
    """'W x H = N pixels, over Pillow's limit ...' when Pillow refuses ``path`` for its size, else None."""
    from PIL import Image

    file = Path(path)
    if not file.is_file() or special_file(file):
        return None
    try:
        with Image.open(file):
            return None
    except Image.DecompressionBombError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # only to read the header's size
            try:
                with Image.open(file) as image:
                    pixels = image.size[0] * image.size[1]
            except Exception:  # anything else wrong with it: no reason to give
                return None
            finally:
                Image.MAX_IMAGE_PIXELS = limit
        return (
            f"{image.size[0]} x {image.size[1]} = {pixels:,} pixels, over Pillow's limit of "
            f"{2 * limit:,} against decompression bombs; shrink it to use it"
        )
    except Exception:  # broken in another way: the list says enough
        return None


__all__ = [
    "ImageSet",
    "DataSource",
    "open_source",
    "native_size",
    "dataset_images",
    "decode_all",
    "split_indices",
    "epoch_order",
    "iterate_batches",
    "random_crop_flip",
    "auto_augment",
    "crop_padding",
    "normalize",
    "decode_file",
    "scan_images",
    "num_batches",
    "warn_skipped",
    "too_many_pixels",
    "Batch",
    "data_provenance",
    "to_rgb",
    "check_readable",
    "UnsupportedPixels",
]

warnings.filterwarnings("ignore", message=".*Palette images with Transparency.*")
# a picture over PIL's decompression-bomb limit (89 M pixels) but under twice it is decoded and shrunk like
# any other: PIL's warning about it, with its source line, is noise among rotnet's own lines (over twice the
# limit PIL refuses it, and it is counted with the unreadable files)
warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit of \d+ pixels")
