"""Embeddings: one vector per image from any stage of a frozen backbone, streamed to a file.

``embed(config, progress)`` runs the backbone over a data source in batches and writes one
row per readable image: its file path (for a built-in or torchvision dataset, ``NAME:SPLIT[INDEX]``),
its class and class index when the data has classes, its split when the source has two
(``train/`` + ``val/``, or a torchvision dataset's train and test sets), and the embedding: the
stage's map pooled over its positions (average or max), optionally L2-normalised. The maps
come from ``features.stage_features``, the probe's own extraction, so an embedding is exactly
what the probe's heads see.

Rows go to disk batch by batch and are never all in memory, nor are the images (folders are
decoded by loader workers as the batches are needed). Tables (.parquet, .csv) are written as
the rows come; array files (.npz, .safetensors) need the row count in their headers, so the
vectors stream into a scratch file beside the output and are copied into place at the end.
Either way the output appears only once it is complete: a failure or Ctrl-C leaves an
earlier file of that name as it was.

``read_embeddings(path)`` reads any of the four formats back, validated like user input, for
``rotnet neighbours`` and ``rotnet viz embeddings``. Library code: nothing here prints.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import csvfiles, jsontext, rundir
from . import data as data_lib
from ._version import __version__
from .atomicfiles import atomic_write, make_dir, printable
from .config import EMBED_POOLS, EmbedConfig
from .errors import ConfigError, DataError, OutputError, RotnetError
from .events import DeviceChosen, Message, Progress, TaskProgress, WarningMessage, ignore
from .features import stage_features, stage_shapes
from .models import num_stages
from .runtime import configure_backends, describe_device, resolve_device, resolve_precision
from .weights import LoadedWeights, kept_checkpoint_path, load_weights

EMBEDDINGS_FORMAT = "rotnet-embeddings"  # the marker in every file's metadata (CSV has no place for one)
METADATA_KEY = "rotnet"  # where the metadata lives: parquet schema metadata, safetensors __metadata__, npz array name
PARQUET_ROW_GROUP_BYTES = 64 * 2**20  # rows are buffered into row groups of about this size
COPY_CHUNK_BYTES = 64 * 2**20  # scratch vectors are copied into the final file in pieces of this size
SAFETENSORS_HEADER_LIMIT = 100_000_000  # bytes: the safetensors readers refuse larger headers
DATASET_ROW = re.compile(r"^(?P<data>.+):(?P<split>[a-z]+)\[(?P<index>\d+)\]$")  # 'digits:train[17]'


# ----------------------------------------------------------------------------- the embedder


@dataclass
class Embedder:
    """One embedding per image: a stage's map of the frozen backbone, pooled, optionally L2-normalised."""

    weights: LoadedWeights
    stage: int  # 1-based
    shape: tuple[int, int, int]  # (C, H, W) of the stage's map
    pool: str  # 'avg' or 'max'
    normalize: bool
    device: torch.device
    precision: str

    @property
    def dim(self) -> int:
        return self.shape[0]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 on the device -> (B, C) float32 on the device."""
        [fmap] = stage_features(
            [("run", self.weights)], [[self.stage]], images, self.device, self.precision
        )  # (B, C, H, W)
        vectors = fmap.mean((2, 3)) if self.pool == "avg" else fmap.amax((2, 3))
        return F.normalize(vectors, dim=1) if self.normalize else vectors


def make_embedder(
    weights: LoadedWeights, layer: int, pool: str, normalize: bool, device: torch.device, precision: str
) -> Embedder:
    """The embedder of stage ``layer`` (1-based, negative from the last) of loaded weights."""
    count = num_stages(weights.backbone)
    if not -count <= layer <= count or layer == 0:
        raise ConfigError(f"--layer {layer}: {weights.model_name} has {count} stages; use 1..{count} or -{count}..-1")
    stage = layer if layer > 0 else count + 1 + layer
    [shape] = stage_shapes([("run", weights)], [[stage]], weights.img_size, device)
    return Embedder(weights, stage, shape, pool, normalize, device, precision)


def host_copy(x: torch.Tensor) -> Callable[[], np.ndarray]:
    """Start copying ``x`` to host memory; the returned function waits for the copy and gives the array.

    On a GPU the copy is queued behind the batch's forward pass and waited for only when the
    rows are written, after the next batch was queued: the device computes while the host writes.
    """
    if x.device.type != "cuda":
        host = x.cpu()
        return host.numpy
    host = x.to("cpu", non_blocking=True)  # into pinned memory; valid once the event has passed
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> np.ndarray:
        copied.synchronize()
        return host.numpy()

    return wait


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Columns:
    """Which optional columns a file has: classes (names, indexed by the label column) and splits."""

    classes: list[str] | None
    splits: list[str] | None  # the split names, when the source has more than one


@dataclass
class Rows:
    """The bookkeeping columns of one batch of embeddings."""

    paths: list[str]
    labels: np.ndarray | None  # (n,) int64, -1 where a row has no class
    split: str | None


@dataclass(frozen=True)
class Split:
    """One split of the source, with the mapping of its own class indices to the file's."""

    name: str
    images: data_lib.ImageSet
    label_map: np.ndarray | None  # own class index -> the file's class index

    def rows(self, indices: torch.Tensor, data: str, with_split: bool) -> Rows:
        idx = indices.tolist()
        if self.images.paths is not None:
            paths = [str(self.images.paths[i]) for i in idx]
        else:  # a built-in or torchvision dataset: no files
            paths = [f"{data}:{self.name}[{i}]" for i in idx]
        labels = None
        if self.images.labels is not None and self.label_map is not None:
            labels = self.label_map[self.images.labels[indices].numpy()]
        return Rows(paths, labels, self.name if with_split else None)


def source_splits(source: data_lib.DataSource) -> tuple[list[Split], Columns]:
    """The source's splits (train, then val) and the file's columns; classes are matched by name across splits."""
    sets = [("train", source.train)] + ([("val", source.val)] if source.val is not None else [])
    names: list[str] = []
    for _, images in sets:
        names += class_names(images) or []
    classes = list(dict.fromkeys(names)) or None
    splits = []
    for name, images in sets:
        own = class_names(images)
        label_map = np.array([classes.index(c) for c in own], dtype=np.int64) if own and classes else None
        splits.append(Split(name, images, label_map))
    return splits, Columns(classes, [name for name, _ in sets] if len(sets) > 1 else None)


def class_names(images: data_lib.ImageSet) -> list[str] | None:
    """The set's class names; a labelled set without names (SVHN) is named by its label numbers."""
    if images.labels is None:
        return None
    if images.classes:
        return list(images.classes)
    return [str(i) for i in range(int(images.labels.max()) + 1 if len(images.labels) else 0)]


# ----------------------------------------------------------------------------- writers
# One class per format: ``write(rows, vectors)`` per batch, ``finish()`` once at the end,
# ``discard()`` always (it removes a scratch file). ``path`` is atomic_write's temporary file.


class CsvWriter:
    """path, class, label, split, e0 ... e{D-1}: one line per image as it comes (no metadata: CSV has no place)."""

    def __init__(self, path: Path, dim: int, columns: Columns, meta: dict[str, Any]):
        self.columns = columns
        self.file = open(path, "w", newline="", encoding="utf-8")
        self.writer = csvfiles.writer(self.file)
        self.writer.writerow(table_columns(columns) + [f"e{i}" for i in range(dim)])

    def write(self, rows: Rows, vectors: np.ndarray) -> None:
        numbers = np.char.mod("%.9g", vectors).tolist()  # 9 digits: a float32 reads back exactly
        for fields, values in zip(row_fields(rows, self.columns), numbers):
            self.writer.writerow(fields + values)

    def finish(self) -> None:
        self.file.close()

    def discard(self) -> None:
        self.file.close()


class ParquetWriter:
    """The table columns and ``embedding`` (a fixed-size list of float32), in row groups of about 64 MiB;
    the settings in the schema metadata under ``rotnet``."""

    def __init__(self, path: Path, dim: int, columns: Columns, meta: dict[str, Any]):
        pa, pq = require_pyarrow()
        self.pa, self.dim, self.columns = pa, dim, columns
        types = {"path": pa.string(), "class": pa.string(), "label": pa.int64(), "split": pa.string()}
        names = table_columns(columns)
        schema = pa.schema(
            [pa.field(n, types[n]) for n in names] + [pa.field("embedding", pa.list_(pa.float32(), dim))],
            metadata={METADATA_KEY: json.dumps(meta)},
        )
        self.schema = schema
        self.writer = pq.ParquetWriter(str(path), schema)
        self.fields: list[list] = []
        self.vectors: list[np.ndarray] = []
        self.group_rows = max(1, PARQUET_ROW_GROUP_BYTES // (4 * dim))

    def write(self, rows: Rows, vectors: np.ndarray) -> None:
        self.fields += row_fields(rows, self.columns, missing=None)
        self.vectors.append(vectors)
        if len(self.fields) >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.fields:
            return
        pa = self.pa
        columns = [list(c) for c in zip(*self.fields)]
        flat = np.ascontiguousarray(np.concatenate(self.vectors), dtype=np.float32).reshape(-1)
        arrays = [pa.array(c, type=f.type) for c, f in zip(columns, self.schema)]
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), self.dim))
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.fields, self.vectors = [], []

    def finish(self) -> None:
        self._flush()
        self.writer.close()

    def discard(self) -> None:
        self.writer.close()


class _ArrayWriter:
    """Vectors to a scratch file as they come; the bookkeeping columns in memory (a few bytes a row)."""

    def __init__(self, path: Path, dim: int, columns: Columns, meta: dict[str, Any]):
        self.path, self.dim, self.columns, self.meta = path, dim, columns, meta
        fd, scratch = tempfile.mkstemp(prefix=f"{path.name}.vectors.", suffix=".tmp", dir=path.parent)
        self.scratch = Path(scratch)
        self.file = os.fdopen(fd, "wb")
        self.rows = 0
        self.paths: list[str] = []
        self.labels: list[np.ndarray] = []
        self.splits: list[str] = []

    def write(self, rows: Rows, vectors: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
        self.rows += len(vectors)
        self.paths += rows.paths
        if self.columns.classes is not None:
            self.labels.append(rows.labels if rows.labels is not None else np.full(len(rows.paths), -1, dtype=np.int64))
        if self.columns.splits is not None:
            self.splits += [rows.split] * len(rows.paths)

    def label_array(self) -> np.ndarray:
        return np.concatenate(self.labels).astype("<i8") if self.labels else np.zeros(0, dtype="<i8")

    def copy_vectors(self, out) -> None:
        """Append the scratch vectors to the open file ``out``."""
        self.file.close()
        with open(self.scratch, "rb") as scratch:
            shutil.copyfileobj(scratch, out, COPY_CHUNK_BYTES)

    def discard(self) -> None:
        self.file.close()
        self.scratch.unlink(missing_ok=True)


class NpzWriter(_ArrayWriter):
    """numpy's .npz (what np.savez writes, uncompressed): embeddings (N, D) float32, paths (N,) str,
    labels (N,) int64 and classes (K,) str when the data has classes, splits (N,) str, rotnet (JSON str)."""

    def finish(self) -> None:
        with zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("embeddings.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": "<f4", "fortran_order": False, "shape": (self.rows, self.dim)}
                )
                self.copy_vectors(f)
            arrays = {"paths": np.array(self.paths, dtype=str), METADATA_KEY: np.array(json.dumps(self.meta))}
            if self.columns.classes is not None:
                arrays.update(labels=self.label_array(), classes=np.array(self.columns.classes, dtype=str))
            if self.columns.splits is not None:
                arrays["splits"] = np.array(self.splits, dtype=str)
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, array, allow_pickle=False)


class SafetensorsWriter(_ArrayWriter):
    """safetensors: ``embeddings`` (N, D) F32 and ``labels`` (N,) I64 when the data has classes; paths, classes,
    splits and the settings as JSON in the metadata. Written in the format's own layout (an 8-byte header
    length, the JSON header, the tensors' bytes) because safetensors' writers need every tensor in memory."""

    @staticmethod
    def check_header(paths_bytes: int) -> None:
        if paths_bytes > SAFETENSORS_HEADER_LIMIT * 0.9:
            raise ConfigError(
                f"the paths of these images take {paths_bytes / 1e6:.0f} MB, more than a safetensors header holds "
                f"({SAFETENSORS_HEADER_LIMIT / 1e6:.0f} MB); write .parquet or .npz instead"
            )

    def finish(self) -> None:
        vector_bytes = 4 * self.rows * self.dim
        tensors: dict[str, Any] = {
            "embeddings": {"dtype": "F32", "shape": [self.rows, self.dim], "data_offsets": [0, vector_bytes]}
        }
        labels = self.label_array() if self.columns.classes is not None else None
        if labels is not None:
            tensors["labels"] = {
                "dtype": "I64",
                "shape": [self.rows],
                "data_offsets": [vector_bytes, vector_bytes + labels.nbytes],
            }
        metadata = {METADATA_KEY: json.dumps(self.meta), "paths": json.dumps(self.paths)}
        if self.columns.classes is not None:
            metadata["classes"] = json.dumps(self.columns.classes)
        if self.columns.splits is not None:
            metadata["splits"] = json.dumps(self.splits)
        header = json.dumps({"__metadata__": metadata, **tensors}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes with spaces
        if len(header) > SAFETENSORS_HEADER_LIMIT:
            raise OutputError(
                f"the safetensors header would take {len(header) / 1e6:.0f} MB; write .parquet or .npz instead"
            )
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(header)) + header)
            self.copy_vectors(out)
            if labels is not None:
                out.write(labels.tobytes())


WRITERS = {".csv": CsvWriter, ".parquet": ParquetWriter, ".npz": NpzWriter, ".safetensors": SafetensorsWriter}


def table_columns(columns: Columns) -> list[str]:
    return (
        ["path"] + (["class", "label"] if columns.classes is not None else []) + (["split"] if columns.splits else [])
    )


def row_fields(rows: Rows, columns: Columns, missing: Any = "") -> list[list]:
    """The bookkeeping values of every row, in ``table_columns`` order; ``missing`` where a row has no class."""
    out = []
    for i, path in enumerate(rows.paths):
        # a table holds UTF-8 text: a file name's bytes that are not UTF-8 are kept as \xNN (printable)
        fields: list = [printable(str(path))]
        if columns.classes is not None:
            label = int(rows.labels[i]) if rows.labels is not None else -1
            fields += [printable(columns.classes[label]), label] if label >= 0 else [missing, missing]
        if columns.splits:
            fields.append(rows.split)
        out.append(fields)
    return out


def require_pyarrow():
    """(pyarrow, pyarrow.parquet), or the one-line error naming the extra."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise RotnetError(
            "parquet files need pyarrow: pip install 'rotnet-cli[parquet]' (or pip install pyarrow)"
        ) from None
    return pa, pq


# ----------------------------------------------------------------------------- embed


@dataclass
class EmbedResult:
    out: Path
    format: str  # 'parquet', 'npz', 'safetensors' or 'csv'
    rows: int
    dim: int
    model: str
    weights: str
    layer: int  # 1-based stage
    stages: int
    layer_shape: tuple[int, int, int]
    pool: str
    normalized: bool
    img_size: int
    data: str
    classes: list[str] | None
    splits: list[str] | None
    device: str
    precision: str
    seconds: float
    skipped: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "format": self.format,
            "rows": self.rows,
            "dim": self.dim,
            "model": self.model,
            "weights": self.weights,
            "layer": self.layer,
            "stages": self.stages,
            "layer_shape": list(self.layer_shape),
            "pool": self.pool,
            "normalized": self.normalized,
            "img_size": self.img_size,
            "data": self.data,
            "classes": self.classes,
            "splits": self.splits,
            "device": self.device,
            "precision": self.precision,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 1),
            "skipped": self.skipped,
        }


def check_out_file(out: Path, overwrite: bool, ours: Callable[[Path], bool] | None = None) -> None:
    """Refuse an --out that is a folder, or a file that exists (unless ``overwrite`` and ``ours``
    says rotnet wrote it: the one --overwrite policy); nothing is changed here."""
    own = ours or is_embeddings_file
    rundir.check_out_file(
        out,
        overwrite=overwrite,
        ours=lambda path: not path.is_symlink() and own(path),  # a link is never replaced
        name_hint=f"a file name, e.g. --out {out / ('embeddings' + out.suffix)}",
    )


def is_embeddings_file(path: Path) -> bool:
    """Whether rotnet embed wrote ``path`` (its metadata says so, whatever the format)."""
    try:
        read_embeddings(path)
    except RotnetError:
        return False
    return True


def embed(cfg: EmbedConfig, progress: Progress | None = None) -> EmbedResult:
    """Write one embedding per image of ``cfg.data`` to ``cfg.out``; see the module docstring."""
    emit = progress or ignore
    out = Path(cfg.out).expanduser()
    check_out_file(out, cfg.overwrite)
    if cfg.format == ".parquet":
        require_pyarrow()  # before any work
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    configure_backends(device)
    emit(DeviceChosen(describe_device(device), precision))

    weights = load_weights(cfg.weights, device, img_size=cfg.img_size)
    if cfg.img_size and weights.kind not in ("timm", "random") and cfg.img_size != weights.img_size:
        raise ConfigError(
            f"--img-size {cfg.img_size}: {cfg.weights} was trained at {weights.img_size} px and is embedded at that size; "
            "drop --img-size (it sets the size of timm:NAME and random:NAME weights)"
        )
    embedder = make_embedder(weights, cfg.layer, cfg.pool, cfg.normalize, device, precision)
    # folders stay files, decoded by loader workers batch by batch: one pass gains nothing from decoding first
    source = data_lib.open_source(
        cfg.data,
        weights.img_size,
        option="DATA",
        download=cfg.download,
        data_dir=cfg.data_dir,
        cache="none",
        workers=cfg.workers,
        strict=cfg.strict_data,
        progress=emit,
    )
    splits, columns = source_splits(source)
    total = sum(len(s.images) for s in splits)
    if cfg.format == ".safetensors":
        SafetensorsWriter.check_header(
            sum(len(str(p)) + 4 for s in splits for p in (s.images.paths or [])) + 24 * total
        )
    meta = embeddings_metadata(cfg, weights, embedder, columns)
    c, h, w = embedder.shape
    emit(
        Message(
            f"{weights.model_name} stage {embedder.stage} of {meta['stages']} ({c} x {h} x {w}, {cfg.pool}-pooled"
            f"{', L2-normalised' if cfg.normalize else ''}) at {weights.img_size} px: {total} images of {cfg.data} -> {out}"
        )
    )

    written, skipped = 0, list(source.skipped)
    t0 = time.perf_counter()

    def write(tmp: Path) -> None:
        nonlocal written
        writer = WRITERS[cfg.format](tmp, embedder.dim, columns, meta)
        try:
            for rows, vectors in embed_batches(embedder, splits, columns, cfg, total, skipped, emit):
                writer.write(rows, vectors)
                written += len(vectors)
            if written == 0:
                raise DataError(f"none of the {total} images of {cfg.data} could be read; nothing was written")
            writer.finish()
        finally:
            writer.discard()

    make_dir(out.parent)
    atomic_write(out, write)
    seconds = time.perf_counter() - t0
    if skipped:
        emit(WarningMessage(data_lib.warn_skipped(skipped)))
    return EmbedResult(
        out=out,
        format=cfg.format.lstrip("."),
        rows=written,
        dim=embedder.dim,
        model=weights.model_name,
        weights=cfg.weights,
        layer=embedder.stage,
        stages=meta["stages"],
        layer_shape=embedder.shape,
        pool=cfg.pool,
        normalized=cfg.normalize,
        img_size=weights.img_size,
        data=cfg.data,
        classes=columns.classes,
        splits=columns.splits,
        device=describe_device(device),
        precision=precision,
        seconds=seconds,
        skipped=skipped,
    )


def embed_batches(
    embedder: Embedder,
    splits: list[Split],
    columns: Columns,
    cfg: EmbedConfig,
    total: int,
    skipped: list[str],
    emit: Progress,
) -> Iterator[tuple[Rows, np.ndarray]]:
    """(rows, (n, D) float32 vectors) batch by batch, in the source's order; unreadable files are added to
    ``skipped``. Each batch is handed out after the next one was queued on the device (see host_copy)."""
    done = 0
    pending: tuple[Rows, Callable[[], np.ndarray]] | None = None
    for split in splits:
        order = torch.arange(len(split.images))
        for batch in data_lib.iterate_batches(
            split.images,
            order,
            cfg.batch_size,
            embedder.device,
            drop_last=False,
            workers=cfg.workers,
            strict=cfg.strict_data,
            with_labels=False,
        ):
            vectors = host_copy(embedder(batch.images))  # (n, D), on its way to the host
            if pending is not None:
                yield pending[0], pending[1]()
            pending = (split.rows(batch.indices, cfg.data, columns.splits is not None), vectors)
            skipped += batch.skipped
            done += len(batch.images) + len(batch.skipped)
            emit(TaskProgress("embed", "embedding", min(done, total), total))
    if pending is not None:
        yield pending[0], pending[1]()
    if done < total:  # files the loader dropped before any batch: the bar still ends full
        emit(TaskProgress("embed", "embedding", total, total))


def weights_fingerprint(backbone: torch.nn.Module) -> str:
    """SHA-256 of the backbone's state (parameters and buffers, such as BatchNorm's running statistics):
    every tensor's name, dtype, shape and bytes, in key order. It names exactly what an embedding depends
    on, whatever file or spec the weights came from; a retrained run or another run's weights differ."""
    digest = hashlib.sha256()
    state = backbone.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def embeddings_metadata(
    cfg: EmbedConfig, weights: LoadedWeights, embedder: Embedder, columns: Columns
) -> dict[str, Any]:
    """What a file records of how it was made: enough for neighbours --query to embed new images the same way."""
    spec = cfg.weights
    if not spec.startswith(("timm:", "random:")):
        # a later command may run from another folder; RUN:best names the file it is now (best moves on)
        local = kept_checkpoint_path(spec) or Path(spec).expanduser()
        if local.exists():
            spec = str(local.resolve())
    return {
        "format": EMBEDDINGS_FORMAT,
        "rotnet_version": __version__,
        "weights": spec,
        "weights_sha256": weights_fingerprint(weights.backbone),
        "model": weights.model_name,
        "layer": embedder.stage,
        "stages": num_stages(weights.backbone),
        "layer_shape": list(embedder.shape),
        "pool": embedder.pool,
        "normalized": embedder.normalize,
        "img_size": weights.img_size,
        "dim": embedder.dim,
        "data": cfg.data,
        "classes": columns.classes,
        "splits": columns.splits,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- reading a file back


@dataclass
class EmbeddingTable:
    """An embeddings file in memory: the vectors and their bookkeeping columns."""

    path: Path
    vectors: np.ndarray  # (N, D) float32
    paths: list[str]
    labels: np.ndarray | None = None  # (N,) int64, -1 where a row has no class
    classes: list[str] | None = None
    splits: list[str] | None = None  # per row
    meta: dict[str, Any] = field(default_factory=dict)  # {} for CSV

    def __len__(self) -> int:
        return len(self.vectors)

    def class_of(self, row: int) -> str | None:
        if self.labels is None or self.classes is None or self.labels[row] < 0:
            return None
        return self.classes[self.labels[row]]


def read_embeddings(path: str | Path) -> EmbeddingTable:
    """Read a file written by rotnet embed (.parquet, .npz, .safetensors or .csv); a DataError names what is wrong."""
    readers = {".parquet": _read_parquet, ".npz": _read_npz, ".safetensors": _read_safetensors, ".csv": _read_csv}
    table = rundir.read_table_file(path, readers, "embeddings", "rotnet embed")
    return _validated(table)


def _not_ours(path: Path, why: str) -> DataError:
    return DataError(
        f"{path} was not written by rotnet embed ({why}); write embeddings with rotnet embed WEIGHTS DATA --out FILE"
    )


def _meta(path: Path, text: str | bytes | None) -> dict[str, Any]:
    if text is None:
        raise _not_ours(path, "no rotnet metadata")
    meta = jsontext.loads(text)
    if not isinstance(meta, dict) or meta.get("format") != EMBEDDINGS_FORMAT:
        raise _not_ours(path, "its metadata is not rotnet's")
    # neighbours --query embeds new images with these settings: a hand-edited value is named, never run
    checks = {
        "weights": lambda v: isinstance(v, str) and bool(v),
        "model": lambda v: isinstance(v, str) and bool(v),
        "layer": lambda v: type(v) is int and v != 0,
        "pool": lambda v: v in EMBED_POOLS,
        "normalized": lambda v: type(v) is bool,
        "img_size": lambda v: v is None or (type(v) is int and v > 0),
        # files from before the fingerprint have none: neighbours --query then says it cannot check
        "weights_sha256": lambda v: v is None or (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None),
    }
    meta.setdefault("weights_sha256", None)
    for key, valid in checks.items():
        if key not in meta or not valid(meta[key]):
            raise DataError(
                f"{path}: its rotnet metadata has {key}={meta.get(key)!r}, which rotnet embed never writes; "
                "write it again with rotnet embed"
            )
    return meta


def _read_npz(path: Path) -> EmbeddingTable:
    with open(path, "rb") as f:
        # np.load takes anything that is neither a zip archive nor an .npy array for a pickle and says so
        if f.read(4) != b"PK\x03\x04":
            raise _not_ours(path, "not a zip archive, as every .npz is")
    with np.load(path, allow_pickle=False) as npz:
        if "embeddings" not in npz.files or "paths" not in npz.files:
            raise _not_ours(path, "no 'embeddings' and 'paths' arrays")
        meta = _meta(path, str(npz[METADATA_KEY]) if METADATA_KEY in npz.files else None)
        return EmbeddingTable(
            path,
            npz["embeddings"],
            npz["paths"].tolist(),
            npz["labels"] if "labels" in npz.files else None,
            npz["classes"].tolist() if "classes" in npz.files else None,
            npz["splits"].tolist() if "splits" in npz.files else None,
            meta,
        )


def _read_safetensors(path: Path) -> EmbeddingTable:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        raw = f.metadata() or {}
        meta = _meta(path, raw.get(METADATA_KEY))
        if "embeddings" not in f.keys() or "paths" not in raw:
            raise _not_ours(path, "no 'embeddings' tensor or no paths")
        labels = f.get_tensor("labels") if "labels" in f.keys() else None
        vectors = f.get_tensor("embeddings")
    return EmbeddingTable(
        path,
        vectors,
        jsontext.loads(raw["paths"]),
        labels,
        jsontext.loads(raw["classes"]) if "classes" in raw else None,
        jsontext.loads(raw["splits"]) if "splits" in raw else None,
        meta,
    )


def _read_parquet(path: Path) -> EmbeddingTable:
    _, pq = require_pyarrow()
    table = pq.read_table(path)
    meta = _meta(path, (table.schema.metadata or {}).get(METADATA_KEY.encode()))
    if "embedding" not in table.column_names or "path" not in table.column_names:
        raise _not_ours(path, "no 'embedding' and 'path' columns")
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    vectors = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    classes = meta.get("classes")
    labels = None
    if "label" in table.column_names:
        labels = np.array([-1 if v is None else v for v in table.column("label").to_pylist()], dtype=np.int64)
    splits = table.column("split").to_pylist() if "split" in table.column_names else None
    return EmbeddingTable(path, vectors, table.column("path").to_pylist(), labels, classes, splits, meta)


def _read_csv(path: Path) -> EmbeddingTable:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0] != "path" or not any(re.fullmatch(r"e\d+", h) for h in header):
            raise _not_ours(path, "its header is not path, ..., e0, e1, ...")
        first = next(i for i, h in enumerate(header) if re.fullmatch(r"e\d+", h))
        named = {h: i for i, h in enumerate(header[:first])}
        paths, classes_seen, labels, splits, vectors = [], {}, [], [], []
        for number, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise DataError(
                    f"{path} line {number} has {len(row)} fields, the header {len(header)}; is the file complete?"
                )
            paths.append(row[0])
            if "label" in named:
                label = int(row[named["label"]]) if row[named["label"]] else -1
                labels.append(label)
                if label >= 0:
                    classes_seen[label] = row[named["class"]]
            if "split" in named:
                splits.append(row[named["split"]])
            vectors.append(row[first:])
    classes = [classes_seen.get(i, str(i)) for i in range(max(classes_seen) + 1)] if classes_seen else None
    return EmbeddingTable(
        path,
        np.array(vectors, dtype=np.float32).reshape(len(paths), len(header) - first),
        paths,
        np.array(labels, dtype=np.int64) if "label" in named else None,
        classes if "label" in named else None,
        splits if "split" in named else None,
        {},
    )


def _validated(table: EmbeddingTable) -> EmbeddingTable:
    """Shapes that agree, finite vectors, labels inside the class list."""
    path, n = table.path, len(table.vectors)
    if table.vectors.ndim != 2 or n == 0 or table.vectors.shape[1] == 0:
        raise DataError(
            f"{path} holds no embeddings (shape {tuple(table.vectors.shape)}); write it again with rotnet embed"
        )
    for name, column in (("paths", table.paths), ("labels", table.labels), ("splits", table.splits)):
        if column is not None and len(column) != n:
            raise DataError(f"{path}: {len(column)} {name} for {n} embeddings; write it again with rotnet embed")
    if (
        table.labels is not None
        and len(table.labels)
        and (table.labels.max() >= len(table.classes or []) or table.labels.min() < -1)
    ):
        raise DataError(
            f"{path}: a label is outside its {len(table.classes or [])} classes; write it again with rotnet embed"
        )
    if not np.isfinite(table.vectors).all():
        raise DataError(f"{path} holds embeddings that are not finite numbers; write it again with rotnet embed")
    table.vectors = np.ascontiguousarray(table.vectors, dtype=np.float32)
    return table


__all__ = [
    "embed",
    "weights_fingerprint",
    "EmbedResult",
    "Embedder",
    "make_embedder",
    "read_embeddings",
    "EmbeddingTable",
    "WRITERS",
]
