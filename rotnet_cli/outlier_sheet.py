"""A contact sheet of the images a run finds most unusual and most typical, with their scores.

``draw_outliers(config, progress)`` reads a file written by ``rotnet score`` (or scores images with
weights first) and draws two grids into one PNG: the N highest scores (most unusual) and the N
lowest (most typical), each thumbnail with its rank and score. Rows of a built-in or torchvision
dataset (``digits:train[17]``) are drawn from that dataset; a file that is gone or unreadable is a
grey tile that says so. Library code: nothing here prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import data as data_lib
from . import rundir
from .config import OutliersSheetConfig, ScoreConfig
from .embedding import DATASET_ROW
from .events import Phase, Progress, ignore
from .viz import check_picture_size, save_png

THUMB = 96  # pixels on a side of each thumbnail
CAPTION = 14  # the text band under a thumbnail
HEADING = 22  # the band above each grid
GAP = 4
MAX_COLUMNS = 8


@dataclass
class OutliersSheetResult:
    out: Path
    width: int
    height: int
    images: int  # rows of the scores
    unusual: list[tuple[str, float]]  # (path, score), most unusual first
    typical: list[tuple[str, float]]  # (path, score), most typical first
    method: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "width": self.width,
            "height": self.height,
            "images": self.images,
            "method": self.method,
            "unusual": [{"path": p, "score": s} for p, s in self.unusual],
            "typical": [{"path": p, "score": s} for p, s in self.typical],
        }


def _scores(cfg: OutliersSheetConfig, emit: Progress) -> tuple[list[str], np.ndarray, str | None]:
    if not cfg.data:
        from .scoring import read_scores

        table = read_scores(cfg.scores)
        return table.paths, table.score, table.method
    from .scoring import score

    result = score(
        ScoreConfig(
            weights=cfg.scores,
            data=cfg.data,
            method=cfg.method,
            img_size=cfg.img_size,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            device=cfg.device,
            precision=cfg.precision,
        ),
        progress=emit,
    )
    return result.rows.paths, result.rows.score, result.method


def draw_outliers(cfg: OutliersSheetConfig, progress: Progress | None = None) -> OutliersSheetResult:
    """Draw the sheet; see the module docstring."""
    emit = progress or ignore
    out = Path(cfg.out).expanduser()
    rundir.check_out_file(out, overwrite=cfg.overwrite)
    paths, scores, method = _scores(cfg, emit)
    order = np.argsort(-scores, kind="stable")
    n_unusual = min(cfg.n, math.ceil(len(order) / 2))  # the two grids never show one image twice
    n_typical = min(cfg.n, len(order) - n_unusual)
    unusual = [(paths[i], float(scores[i])) for i in order[:n_unusual]]
    typical = [(paths[i], float(scores[i])) for i in order[::-1][:n_typical]]
    columns = min(MAX_COLUMNS, max(n_unusual, n_typical, 1))
    grid_rows = [math.ceil(n_unusual / columns), math.ceil(n_typical / columns)]
    width = GAP + columns * (THUMB + GAP)
    height = sum(HEADING + r * (THUMB + CAPTION + GAP) for r in grid_rows if r) + GAP
    check_picture_size(width, height, "-n", "lower -n")
    emit(Phase(f"drawing {n_unusual + n_typical} images"))

    from PIL import Image, ImageDraw

    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    loader = _Thumbnails()
    y = 0
    sections = [
        (f"the {n_unusual} most unusual (highest score)", unusual),
        (f"the {n_typical} most typical (lowest score)", typical),
    ]
    for title, items in sections:
        if not items:
            continue
        draw.text((GAP, y + 5), title, fill="black")
        y += HEADING
        for k, (path, value) in enumerate(items):
            x = GAP + (k % columns) * (THUMB + GAP)
            top = y + (k // columns) * (THUMB + CAPTION + GAP)
            sheet.paste(loader.get(path), (x, top))
            draw.text((x + 2, top + THUMB + 1), f"{k + 1}. {value:.4g}", fill="black")
        y += math.ceil(len(items) / columns) * (THUMB + CAPTION + GAP)
    save_png(sheet, out)
    return OutliersSheetResult(out, width, height, len(paths), unusual, typical, method)


class _Thumbnails:
    """THUMB-sized PIL images of score rows: files as rotnet decodes them (EXIF applied, centre crop),
    dataset rows from their dataset (opened once each)."""

    def __init__(self) -> None:
        self.sources: dict[str, data_lib.DataSource | None] = {}

    def get(self, path: str):
        from PIL import Image, ImageDraw

        try:
            pixels = self._pixels(path)  # (3, S, S) uint8
            return Image.fromarray(pixels.permute(1, 2, 0).numpy(), mode="RGB")
        except Exception:  # gone, unreadable, or a row of a dataset that is not here: a tile that says so
            tile = Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
            ImageDraw.Draw(tile).text((6, THUMB // 2 - 6), "not readable", fill="black")
            return tile

    def _pixels(self, path: str):
        match = DATASET_ROW.match(path)
        if match and not Path(path).exists():
            name = match["data"]
            if name not in self.sources:
                self.sources[name] = data_lib.open_source(name, THUMB, cache="none", workers=0)
            source = self.sources[name]
            images = source.train if match["split"] == "train" else source.val
            return images.images[int(match["index"])]
        return data_lib.decode_file(Path(path), THUMB)


__all__ = ["draw_outliers", "OutliersSheetResult"]
