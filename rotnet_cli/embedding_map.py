"""A 2-D map of embeddings (``rotnet viz embeddings``): PCA, t-SNE or UMAP, coloured by class.

The rows of a file written by rotnet embed (a seeded sample of ``max_points`` of them when
there are more) are L2-normalised, so the map shows the cosine geometry that
``rotnet neighbours`` searches, and projected to two dimensions:

- ``pca`` (default): the two leading principal components, computed here with torch (an
  eigendecomposition of the D x D covariance); needs nothing beyond rotnet;
- ``tsne``: scikit-learn's TSNE (the ``tsne`` extra), ``umap``: umap-learn's UMAP (the
  ``umap`` extra); both on the 50 leading principal components when there are more
  dimensions, as is usual for either.

matplotlib (the ``plot`` extra) draws the points, one colour per class with a legend, and
optionally image thumbnails at points spread over the map. Library code: nothing here prints.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data as data_lib
from . import rundir
from ._version import __version__
from .atomicfiles import atomic_write, make_dir
from .config import EmbeddingMapConfig
from .embedding import DATASET_ROW, EmbeddingTable, read_embeddings
from .errors import RotnetError
from .events import Message, Progress, WarningMessage, ignore
from .plotting import pyplot

PRE_PCA_DIMS = 50  # t-SNE and UMAP run on this many principal components (their usual preprocessing)
THUMBNAIL_PX = 48  # thumbnails are decoded at this size
MAX_LEGEND_CLASSES = 30  # beyond this many classes the colours stay and the legend goes
METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}


@dataclass
class EmbeddingMapResult:
    out: Path
    method: str
    points: int  # rows drawn
    rows: int  # rows in the file
    classes: int  # 0 when the file has none
    explained_variance: list[float] | None  # PCA: share of the variance along each axis
    thumbnails: int
    width: int
    height: int
    skipped: list[str] = field(default_factory=list)  # thumbnails that could not be read

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "method": self.method,
            "points": self.points,
            "rows": self.rows,
            "classes": self.classes,
            "explained_variance": self.explained_variance,
            "thumbnails": self.thumbnails,
            "width": self.width,
            "height": self.height,
            "skipped": self.skipped,
        }


# ----------------------------------------------------------------------------- projections


def pca(x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> ((N, dims) coordinates along the leading principal components, (dims,) share of the variance).

    Signs are fixed as scikit-learn fixes them (the largest loading of every component is positive), so
    the same data gives the same picture.
    """
    data = torch.from_numpy(x).double()
    centred = data - data.mean(0)
    values, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending
    dims = min(dims, vectors.shape[1])
    top = vectors[:, -dims:].flip(1)  # (D, dims), the largest first
    signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
    top = top * signs
    explained = values[-dims:].flip(0).clamp_min(0) / values.clamp_min(0).sum().clamp_min(1e-300)
    return (centred @ top).float().numpy(), explained.float().numpy()


def project(x: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, list[float] | None]:
    """(N, D) -> ((N, 2) map coordinates, PCA's share of the variance per axis or None)."""
    if method == "pca":
        coords, explained = pca(x, 2)
        return coords, [round(float(v), 4) for v in explained]
    reduced = pca(x, PRE_PCA_DIMS)[0] if x.shape[1] > PRE_PCA_DIMS else x
    n = len(reduced)
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            raise RotnetError(
                "--method tsne needs scikit-learn: pip install 'rotnet-cli[tsne]' (or pip install scikit-learn)"
            ) from None
        # perplexity must stay below the number of points; 30 is the usual value
        tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed)
        return np.asarray(tsne.fit_transform(reduced), dtype=np.float32), None
    try:
        import umap
    except ImportError:
        raise RotnetError(
            "--method umap needs umap-learn: pip install 'rotnet-cli[umap]' (or pip install umap-learn)"
        ) from None
    reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed)
    return np.asarray(reducer.fit_transform(reduced), dtype=np.float32), None


# ----------------------------------------------------------------------------- thumbnails


def spread_points(coords: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` rows spread over the map: the map is cut into a grid with at least ``count`` occupied
    cells where it can (finer while too few are), and each cell gives the point nearest its centre (the fullest cells
    first when there are more cells than ``count``)."""
    count = min(count, len(coords))
    if count <= 0:
        return []
    low, high = coords.min(0), coords.max(0)
    side = math.ceil(math.sqrt(count))
    while True:
        size = np.maximum(high - low, 1e-12) / side
        cells = np.minimum(((coords - low) / size).astype(int), side - 1)  # (N, 2)
        cell_id = cells[:, 0] * side + cells[:, 1]
        occupied = np.unique(cell_id)
        if len(occupied) >= count or side > 4096:  # points on the same spot never part: stop somewhere
            break
        side = math.ceil(side * 1.5)
    distance = ((coords - (low + (cells + 0.5) * size)) ** 2).sum(1)  # to the centre of its cell
    chosen = []
    for cell in occupied:
        members = np.flatnonzero(cell_id == cell)
        chosen.append((len(members), int(members[distance[members].argmin()])))
    chosen.sort(key=lambda c: -c[0])
    return sorted(row for _, row in chosen[:count])


class ThumbnailSource:
    """The pixels of a row: its file, or its image in the built-in or torchvision dataset it came from."""

    def __init__(self, table: EmbeddingTable):
        self.meta = table.meta
        self.sources: dict[str, data_lib.DataSource] = {}

    def image(self, path: str) -> np.ndarray:
        """(S, S, 3) uint8; raises on anything unreadable."""
        match = DATASET_ROW.match(path)
        if match and not Path(path).exists():
            source = self._source(match["data"])
            images = source.val if match["split"] == "val" else source.train
            return images.images[int(match["index"])].permute(1, 2, 0).numpy()
        return data_lib.decode_file(Path(path), THUMBNAIL_PX).permute(1, 2, 0).numpy()

    def _source(self, spec: str) -> data_lib.DataSource:
        if spec not in self.sources:
            size = int(self.meta.get("img_size") or THUMBNAIL_PX)
            self.sources[spec] = data_lib.open_source(spec, size)
        return self.sources[spec]


# ----------------------------------------------------------------------------- drawing


def class_colours(plt, count: int) -> list:
    """Distinct colours: tab10 / tab20 for up to 20 classes, evenly spaced hues of a cyclic map beyond."""
    if count <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(count)]
    if count <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(count)]
    return [plt.get_cmap("hsv")(i / count) for i in range(count)]


def draw_embedding_map(cfg: EmbeddingMapConfig, progress: Progress | None = None) -> EmbeddingMapResult:
    """Project the embeddings of ``cfg.embeddings`` to 2-D and draw them as ``cfg.out``; see the module docstring."""
    emit = progress or ignore
    plt = pyplot("rotnet viz embeddings")  # before any work: a missing extra is known at once
    out = Path(cfg.out).expanduser()
    rundir.check_out_file(out, overwrite=cfg.overwrite)  # an existing picture: only with --overwrite, only rotnet's
    table = read_embeddings(cfg.embeddings)
    rows = np.arange(len(table))
    if len(rows) > cfg.max_points:
        rows = np.sort(np.random.default_rng(cfg.seed).choice(len(rows), cfg.max_points, replace=False))
    if len(rows) < 3:
        raise RotnetError(f"{table.path} holds {len(rows)} embedding(s); a map needs at least 3")
    x = table.vectors[rows]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # the cosine geometry neighbours searches
    emit(Message(f"{METHOD_NAMES[cfg.method]} of {len(rows)} of {len(table)} embeddings ({x.shape[1]} dimensions)"))
    coords, explained = project(x, cfg.method, cfg.seed)

    fig, ax = plt.subplots(figsize=(9, 8), dpi=100)
    size = float(np.clip(20000 / len(rows), 3, 40))  # smaller points when there are many: 11 pt² for 1,797
    labels = table.labels[rows] if table.labels is not None else None
    colours: list = []
    if labels is not None and table.classes:
        colours = class_colours(plt, len(table.classes))
        for c, name in enumerate(table.classes):
            members = labels == c
            if members.any():
                ax.scatter(
                    coords[members, 0],
                    coords[members, 1],
                    s=size,
                    color=colours[c],
                    alpha=0.75,
                    linewidths=0,
                    label=name,
                )
        if (labels < 0).any():
            ax.scatter(
                coords[labels < 0, 0],
                coords[labels < 0, 1],
                s=size,
                color="0.6",
                alpha=0.6,
                linewidths=0,
                label="(none)",
            )
        if len(table.classes) <= MAX_LEGEND_CLASSES:
            ax.legend(
                title="class", markerscale=max(1.0, 6 / math.sqrt(size)), fontsize="small", loc="best", framealpha=0.8
            )
    else:
        ax.scatter(coords[:, 0], coords[:, 1], s=size, color="tab:blue", alpha=0.7, linewidths=0)

    thumbnails, skipped = draw_thumbnails(ax, table, rows, coords, labels, colours, cfg.thumbnails, emit)
    meta = table.meta
    what = f"{meta['model']}, stage {meta['layer']} ({meta['pool']}-pooled)" if meta else table.path.name
    ax.set_title(f"{what}: {METHOD_NAMES[cfg.method]} of {len(rows)} images", fontsize="medium")
    if explained:
        ax.set_xlabel(f"PC 1 ({100 * explained[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC 2 ({100 * explained[1]:.1f}% of variance)")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", metadata={"Software": f"{rundir.PICTURE_SOFTWARE} {__version__}"})  # rotnet drew it
    width, height = (int(v) for v in fig.canvas.get_width_height())
    plt.close(fig)

    make_dir(out.parent)
    atomic_write(out, lambda tmp: tmp.write_bytes(png.getvalue()))
    return EmbeddingMapResult(
        out, cfg.method, len(rows), len(table), len(table.classes or []), explained, thumbnails, width, height, skipped
    )


def draw_thumbnails(
    ax,
    table: EmbeddingTable,
    rows: np.ndarray,
    coords: np.ndarray,
    labels: np.ndarray | None,
    colours: list,
    count: int,
    emit: Progress,
) -> tuple[int, list[str]]:
    """Images at up to ``count`` points spread over the map, framed in their class colour
    -> (thumbnails drawn, the rows whose image could not be read)."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    pixels = ThumbnailSource(table)
    drawn, skipped = 0, []
    for point in spread_points(coords, count):
        path = table.paths[rows[point]]
        try:
            image = pixels.image(path)
        except Exception as e:  # PIL and the dataset readers raise many types for unreadable images
            skipped.append(f"{path} ({type(e).__name__})")
            continue
        label = labels[point] if labels is not None else -1
        frame = colours[label] if label >= 0 and colours else "0.3"
        zoom = 28 / max(image.shape[:2])  # about 28 points across, whatever the decoded size
        box = AnnotationBbox(
            OffsetImage(image, zoom=zoom, cmap="gray"),
            coords[point],
            frameon=True,
            pad=0.15,
            bboxprops={"edgecolor": frame, "linewidth": 1.5},
        )
        ax.add_artist(box)
        drawn += 1
    if skipped:
        emit(WarningMessage(f"{len(skipped)} thumbnail(s) could not be read, e.g. {skipped[0]}"))
    return drawn, skipped


__all__ = ["draw_embedding_map", "EmbeddingMapResult", "pca", "project", "spread_points"]
