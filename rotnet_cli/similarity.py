"""Nearest neighbours among embeddings: cosine similarity on the device, in blocks.

``neighbours(config, progress)`` answers two questions about a file written by rotnet embed:

- with ``query`` images: which rows are nearest to each of them? The images are embedded the
  way the file was (its weights, stage, pooling and normalisation, from its metadata), and a
  query image that is itself a row of the file is not its own neighbour;
- without: which pairs of rows are most alike? Every row's k nearest other rows, each pair
  once, most similar first: near-duplicates lead the table (``threshold`` keeps only pairs at
  least that similar).

``top_k_cosine`` does the search: queries and rows are L2-normalised, and the similarities
are computed one (query block x row block) tile at a time, each tile's best k merged into a
running best k per query. Memory is the rows themselves (N x D) plus one tile, never an
N x N matrix; the rows move to the device once when they fit in half its free memory, else
tile by tile. Library code: nothing here prints.
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import csvfiles
from . import data as data_lib
from .atomicfiles import atomic_write, make_dir
from .config import NeighboursConfig
from .embedding import EmbeddingTable, check_out_file, make_embedder, read_embeddings, weights_fingerprint
from .errors import ConfigError, DataError, WeightsError
from .events import DeviceChosen, Message, Progress, TaskProgress, WarningMessage, ignore
from .runtime import configure_backends, describe_device, resolve_device, resolve_precision
from .weights import kept_checkpoint_path, load_weights

QUERY_BLOCK = 1024  # queries per tile
TILE_ELEMENTS = 2**24  # similarities per tile (64 MiB of float32): the rows of a tile follow from it
NORMALIZE_CHUNK = 65536  # rows L2-normalised at a time, in place


@dataclass
class Neighbour:
    """One row of the result: ``neighbour`` is the ``rank``-th nearest row (1 = nearest) to ``image``."""

    image: str
    rank: int
    neighbour: str
    similarity: float
    image_class: str | None = None
    neighbour_class: str | None = None


@dataclass
class NeighboursResult:
    embeddings: str
    mode: str  # 'query' (the k nearest rows of each query image) or 'pairs' (the most alike pairs of rows)
    rows: int  # rows in the embeddings file
    queries: int  # images looked up (pairs: every row)
    k: int
    threshold: float | None
    device: str
    seconds: float
    neighbours: list[Neighbour] = field(default_factory=list)
    out: Path | None = None
    skipped: list[str] = field(default_factory=list)  # query files that could not be read

    @property
    def has_classes(self) -> bool:
        return any(n.image_class is not None or n.neighbour_class is not None for n in self.neighbours)

    def to_dict(self) -> dict[str, Any]:
        return {
            "embeddings": self.embeddings,
            "mode": self.mode,
            "rows": self.rows,
            "queries": self.queries,
            "k": self.k,
            "threshold": self.threshold,
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "out": str(self.out) if self.out else None,
            "skipped": self.skipped,
            "neighbours": [asdict(n) | {"similarity": round(n.similarity, 6)} for n in self.neighbours],
        }


# ----------------------------------------------------------------------------- the search


@contextlib.contextmanager
def full_fp32_matmuls():
    """Similarities in full fp32: TF32 (which rotnet allows on CUDA for speed) keeps 10 bits of mantissa,
    too few to order near-duplicates whose similarities differ in the fourth decimal."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def normalize_rows_(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the rows of ``x`` in place, a chunk at a time (no second copy of a large bank)."""
    for start in range(0, len(x), NORMALIZE_CHUNK):
        chunk = x[start : start + NORMALIZE_CHUNK]
        chunk.div_(chunk.norm(dim=1, keepdim=True).clamp_min_(1e-12))
    return x


@torch.no_grad()
def top_k_cosine(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    device: torch.device,
    exclude: torch.Tensor | None = None,
    query_block: int = QUERY_BLOCK,
    tile_elements: int = TILE_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k rows of ``bank`` most cosine-similar to each query: (similarity (Q, k) float32, index (Q, k) int64), on the host.

    queries (Q, D) and bank (N, D) must be L2-normalised. ``exclude`` (Q,) int64 names one bank row per
    query that must not be found (the query itself), -1 for none. Where fewer than k rows can be found,
    the index is -1 and the similarity -inf.
    """
    n = len(bank)
    bank_block = max(1, tile_elements // query_block)
    on_device = bank if bank.device == device else _to_device_if_fits(bank, device)
    sims_out = torch.empty(len(queries), k)
    index_out = torch.empty(len(queries), k, dtype=torch.long)
    with full_fp32_matmuls():
        for q0 in range(0, len(queries), query_block):
            q = queries[q0 : q0 + query_block].to(device, non_blocking=True)  # (q, D)
            drop = exclude[q0 : q0 + query_block].to(device) if exclude is not None else None
            best = torch.full((len(q), k), -torch.inf, device=device)  # (q, k), most similar first
            best_index = torch.full((len(q), k), -1, dtype=torch.long, device=device)
            for b0 in range(0, n, bank_block):
                block = on_device[b0 : b0 + bank_block].to(device, non_blocking=True)  # (b, D)
                sims = q @ block.T  # (q, b)
                if drop is not None:  # the excluded row, where it falls in this block, can never be chosen
                    local = drop - b0
                    inside = (local >= 0) & (local < len(block))
                    column = local.clamp(0, len(block) - 1)[:, None]
                    sims.scatter_(1, column, torch.where(inside[:, None], -torch.inf, sims.gather(1, column)))
                top, where = sims.topk(min(k, len(block)), dim=1)  # (q, <=k)
                merged = torch.cat([best, top], dim=1)
                merged_index = torch.cat([best_index, where + b0], dim=1)
                best, pick = merged.topk(k, dim=1)
                best_index = merged_index.gather(1, pick)
            best_index = torch.where(torch.isinf(best), -1, best_index)  # nothing left to find
            sims_out[q0 : q0 + len(q)] = best.cpu()
            index_out[q0 : q0 + len(q)] = best_index.cpu()
    return sims_out, index_out


def _to_device_if_fits(bank: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The bank on the device when it takes less than half its free memory; else it stays, and tiles travel."""
    if device.type != "cuda" or bank.numel() * bank.element_size() < torch.cuda.mem_get_info(device)[0] // 2:
        return bank.to(device)
    return bank.pin_memory()  # tiles then travel without a staging copy


# ----------------------------------------------------------------------------- the command


def neighbours(cfg: NeighboursConfig, progress: Progress | None = None) -> NeighboursResult:
    """Look up query images in an embeddings file, or find its most alike pairs; see the module docstring."""
    emit = progress or ignore
    out = Path(cfg.out).expanduser() if cfg.out else None
    if out is not None:
        check_out_file(out, cfg.overwrite, ours=is_neighbours_csv)
    table = read_embeddings(cfg.embeddings)
    device = resolve_device(cfg.device)
    emit(DeviceChosen(describe_device(device), resolve_precision(cfg.precision, device)))
    t0 = time.perf_counter()
    bank = normalize_rows_(torch.from_numpy(table.vectors))  # (N, D); the table's own array, normalised in place
    k = min(cfg.k, len(table) - (0 if cfg.query else 1))
    if k < 1:
        raise DataError(f"{table.path} holds a single image: it has no neighbours")

    skipped: list[str] = []
    if cfg.query:
        names, queries, skipped = embed_queries(cfg, table, device, emit)
        exclude = own_rows(names, table)
        emit(Message(f"{len(names)} query image(s) against {len(table)} rows of {table.path}, k={k}"))
        sims, index = top_k_cosine(normalize_rows_(queries), bank, k, device, exclude)
        found = []
        for name, own, row_sims, row_index in zip(names, exclude.tolist(), sims.tolist(), index.tolist()):
            own_class = table.class_of(own) if own >= 0 else None  # a query that is a row of the file has its class
            found += [
                Neighbour(name, rank + 1, table.paths[j], s, own_class, table.class_of(j))
                for rank, (s, j) in enumerate(zip(row_sims, row_index))
                if j >= 0
            ]
        mode, queried = "query", len(names)
    else:
        emit(Message(f"the {k} nearest of each of the {len(table)} rows of {table.path}: the most alike pairs"))
        sims, index = top_k_cosine(bank, bank, k, device, exclude=torch.arange(len(table)))
        found = most_alike_pairs(table, sims, index)
        mode, queried = "pairs", len(table)
    if cfg.threshold is not None:
        found = [n for n in found if n.similarity >= cfg.threshold]
    emit(TaskProgress("neighbours", "searching", 1, 1))

    result = NeighboursResult(
        str(table.path),
        mode,
        len(table),
        queried,
        k,
        cfg.threshold,
        describe_device(device),
        time.perf_counter() - t0,
        found,
        out,
        skipped,
    )
    if out is not None:
        make_dir(out.parent)
        write_neighbours_csv(out, found)
    return result


def most_alike_pairs(table: EmbeddingTable, sims: torch.Tensor, index: torch.Tensor) -> list[Neighbour]:
    """Every (row, one of its k nearest) pair once, most similar first (ties: in row order)."""
    order = torch.argsort(sims.flatten(), descending=True, stable=True).tolist()
    k = sims.shape[1]
    flat_index = index.flatten().tolist()
    flat_sims = sims.flatten().tolist()
    seen: set[tuple[int, int]] = set()
    pairs = []
    for position in order:
        (i, rank), j = divmod(position, k), flat_index[position]
        pair = (min(i, j), max(i, j))
        if j < 0 or pair in seen:
            continue
        seen.add(pair)
        pairs.append(
            Neighbour(
                table.paths[i], rank + 1, table.paths[j], flat_sims[position], table.class_of(i), table.class_of(j)
            )
        )
    return pairs


def embed_queries(
    cfg: NeighboursConfig, table: EmbeddingTable, device: torch.device, emit: Progress
) -> tuple[list[str], torch.Tensor, list[str]]:
    """(names of the readable query images, their (Q, D) embeddings on the host, the unreadable ones)."""
    meta = table.meta
    if not meta:
        raise ConfigError(
            f"{table.path} is a CSV, which keeps no record of how it was embedded; --query needs "
            "embeddings written as .parquet, .npz or .safetensors"
        )
    spec = cfg.weights or meta["weights"]
    if cfg.weights is None and not weights_exist(spec):
        raise ConfigError(f"{table.path} was embedded with {spec}, which is not here; give the weights with --weights")
    precision = resolve_precision(cfg.precision, device)
    configure_backends(device)
    weights = load_weights(spec, device, img_size=meta["img_size"])
    if weights.model_name != meta["model"]:
        raise ConfigError(
            f"--weights {spec} is a {weights.model_name}; {table.path} was embedded with a {meta['model']}"
        )
    check_same_weights(table, spec, cfg.weights is not None, weights_fingerprint(weights.backbone), emit)
    embedder = make_embedder(weights, meta["layer"], meta["pool"], meta["normalized"], device, precision)
    if embedder.dim != table.vectors.shape[1]:
        raise DataError(
            f"{spec} gives {embedder.dim} dimensions at stage {meta['layer']}, {table.path} holds "
            f"{table.vectors.shape[1]}; give the weights it was embedded with"
        )
    files = [path for path, _ in data_lib.image_inputs(cfg.query)]
    images = data_lib.ImageSet("query", meta["img_size"], paths=files)
    names, vectors, skipped = [], [], []
    for batch in data_lib.iterate_batches(
        images,
        torch.arange(len(files)),
        cfg.batch_size,
        device,
        drop_last=False,
        workers=min(cfg.workers, len(files)),
        with_labels=False,
    ):
        names += [str(files[i]) for i in batch.indices.tolist()]
        vectors.append(embedder(batch.images).cpu())
        skipped += batch.skipped
    if skipped:
        emit(WarningMessage(data_lib.warn_skipped(skipped)))
    if not names:
        raise DataError(f"none of the {len(files)} query images could be read")
    return names, torch.cat(vectors), skipped


def check_same_weights(table: EmbeddingTable, spec: str, given: bool, fingerprint: str, emit: Progress) -> None:
    """Queries embedded with other weights than the file's rows are ranked by noise (an exact copy 30th):
    refuse when the fingerprints differ, warn when the file is too old to have one."""
    recorded = table.meta.get("weights_sha256")
    if recorded is None:
        emit(
            WarningMessage(
                f"{table.path} records no fingerprint of the weights that made it (an older rotnet), so rotnet "
                f"cannot check that {spec} are those weights; re-run rotnet embed to record it"
            )
        )
    elif recorded != fingerprint:
        fix = (
            "pass the --weights that made it, or re-run rotnet embed with these weights"
            if given
            else f"re-run rotnet embed with {spec}, or pass --weights with the weights that made it"
        )
        raise ConfigError(
            f"{'--weights ' if given else ''}{spec} are not the weights that made {table.path} (their fingerprints "
            f"differ: retrained since, or another run); {fix}"
        )


def weights_exist(spec: str) -> bool:
    """Whether a weights spec names something here: timm:/random:, a path, or a kept checkpoint (RUN:best)."""
    if spec.startswith(("timm:", "random:")):
        return True
    try:
        return (kept_checkpoint_path(spec) or Path(spec).expanduser()).exists()
    except WeightsError:  # RUN:epoch-E that the run no longer keeps
        return False


def own_rows(names: list[str], table: EmbeddingTable) -> torch.Tensor:
    """(Q,) int64: the row of the file that is the query image itself, -1 where none is."""
    rows = {os.path.abspath(p): i for i, p in enumerate(table.paths)}
    return torch.tensor([rows.get(os.path.abspath(name), -1) for name in names], dtype=torch.long)


NEIGHBOUR_FIELDS = ("image", "rank", "neighbour", "similarity", "image_class", "neighbour_class")


def is_neighbours_csv(path: Path) -> bool:
    """Whether ``path`` is a neighbours table rotnet wrote (its header row is rotnet's)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), None) == list(NEIGHBOUR_FIELDS)
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def write_neighbours_csv(out: Path, found: list[Neighbour]) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csvfiles.writer(f)
            writer.writerow(NEIGHBOUR_FIELDS)
            for n in found:
                writer.writerow(
                    [n.image, n.rank, n.neighbour, f"{n.similarity:.6f}", n.image_class or "", n.neighbour_class or ""]
                )

    return atomic_write(out, write)


__all__ = ["neighbours", "NeighboursResult", "Neighbour", "top_k_cosine", "normalize_rows_"]
