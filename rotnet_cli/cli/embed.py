"""rotnet embed, rotnet neighbours and rotnet viz embeddings: the features themselves, for search, clustering and maps."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..config import EmbedConfig, EmbeddingMapConfig, NeighboursConfig, option_default
from ._common import (
    DataDirOpt,
    DeviceOpt,
    DownloadOpt,
    JsonOpt,
    OverwriteOpt,
    PrecisionOpt,
    StrictDataOpt,
    WeightsArg,
    WeightsImgSizeOpt,
    WorkersOpt,
    err_console,
    error_boundary,
    out_console,
    print_json,
    print_table,
    shown,
    warn_skipped,
)
from .progress import ProgressView

EMBED_EXAMPLES = """
[b]Examples[/b]

  rotnet embed runs/demo digits --out digits.parquet          [dim]# pandas.read_parquet("digits.parquet")[/dim]
  rotnet embed runs/demo ~/photos --out photos.npz --layer 3 --normalize
  rotnet embed runs/demo ~/photos --out photos.safetensors --pool max --device cuda
  rotnet embed timm:resnet50 ~/photos --out photos.csv --img-size 224 --json
"""

NEIGHBOURS_EXAMPLES = """
[b]Examples[/b]

  rotnet neighbours photos.parquet                            [dim]# the most alike pairs: near-duplicates first[/dim]
  rotnet neighbours photos.parquet --threshold 0.98 --out duplicates.csv
  rotnet neighbours photos.parquet --query cat.jpg -k 10      [dim]# the 10 nearest images of cat.jpg[/dim]
  rotnet neighbours photos.parquet --query new/ --out nearest.csv --json
"""

MAP_EXAMPLES = """
[b]Examples[/b]

  rotnet viz embeddings digits.parquet --out map.png          [dim]# PCA, coloured by class; needs the plot extra[/dim]
  rotnet viz embeddings photos.npz --method tsne --thumbnails 40 --out tsne.png  [dim]# pip install 'rotnet-cli\\[tsne]'[/dim]
  rotnet viz embeddings photos.npz --method umap --out umap.png                  [dim]# pip install 'rotnet-cli\\[umap]'[/dim]
"""

EmbeddingsArg = Annotated[
    str,
    typer.Argument(help="A file written by rotnet embed (.parquet, .npz, .safetensors or .csv).", show_default=False),
]


@error_boundary
def embed(
    ctx: typer.Context,
    weights: WeightsArg,
    data: Annotated[
        str,
        typer.Argument(
            help="A folder of images (flat or class sub-folders, searched recursively; train/ + val/ both), digits, or cifar10, cifar100, stl10, mnist, fashionmnist, svhn.",
            show_default=False,
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="File to write; its extension picks the format: .parquet (needs the parquet extra), .npz, .safetensors or .csv.",
            show_default=False,
        ),
    ],
    layer: Annotated[
        int,
        typer.Option(
            "--layer", help="Stage whose map is pooled: 1-based, negative from the last (-1: the last stage)."
        ),
    ] = option_default(EmbedConfig, "layer"),
    pool: Annotated[
        str, typer.Option("--pool", help="How a stage's map becomes one vector: avg or max over its positions.")
    ] = option_default(EmbedConfig, "pool"),
    normalize: Annotated[
        bool,
        typer.Option("--normalize", help="L2-normalise every embedding (cosine similarity becomes a dot product)."),
    ] = option_default(EmbedConfig, "normalize"),
    img_size: WeightsImgSizeOpt = option_default(EmbedConfig, "img_size"),
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", "-b", help="Images per batch."),
    ] = option_default(EmbedConfig, "batch_size"),
    workers: WorkersOpt = option_default(EmbedConfig, "workers"),
    data_dir: DataDirOpt = option_default(EmbedConfig, "data_dir"),
    download: DownloadOpt = option_default(EmbedConfig, "download"),
    strict_data: StrictDataOpt = option_default(EmbedConfig, "strict_data"),
    device: DeviceOpt = option_default(EmbedConfig, "device"),
    precision: PrecisionOpt = option_default(EmbedConfig, "precision"),
    overwrite: OverwriteOpt = option_default(EmbedConfig, "overwrite"),
    json_out: JsonOpt = False,
) -> None:
    """One embedding per image (a stage of the backbone, pooled), with its path and class, streamed to a file."""
    from ..embedding import embed as run_embed

    config = EmbedConfig.from_dict(ctx.params)
    with ProgressView(err_console, title="embed") as view:
        result = run_embed(config, progress=view)
    warn_skipped(result.skipped)
    if json_out:
        print_json(result.to_dict())
        return
    c, h, w = result.layer_shape
    classes = f", {len(result.classes)} classes" if result.classes else ""
    out_console.print(
        f"wrote {result.rows:,} embeddings of {result.dim} dimensions ({result.model} stage {result.layer} of {result.stages}, "
        f"{c} x {h} x {w} {result.pool}-pooled{', L2-normalised' if result.normalized else ''}{classes}) to "
        f"[bold]{shown(str(result.out))}[/] in {result.seconds:.1f}s ({result.images_per_s:,.0f} images/s)",
        highlight=False,
        soft_wrap=True,
    )
    loaders = {
        "parquet": f'pandas.read_parquet("{result.out}")  # columns path, ..., embedding',
        "npz": f'numpy.load("{result.out}")["embeddings"]  # also paths, labels, classes',
        "safetensors": f'safetensors.numpy.load_file("{result.out}")["embeddings"]',
        "csv": f'pandas.read_csv("{result.out}")  # columns path, ..., e0, e1, ...',
    }
    out_console.print(f"load it with: {loaders[result.format]}", markup=False, highlight=False, soft_wrap=True)


@error_boundary
def neighbours(
    ctx: typer.Context,
    embeddings: EmbeddingsArg,
    query: Annotated[
        list[str] | None,
        typer.Option(
            "--query",
            "-q",
            help="Image file or folder to look up (repeatable), embedded as the file was; default: the most alike pairs of the file's own images.",
        ),
    ] = option_default(NeighboursConfig, "query"),
    k: Annotated[int, typer.Option("-k", help="Neighbours per image.")] = option_default(NeighboursConfig, "k"),
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold", help="Keep only neighbours at least this cosine-similar, e.g. 0.98 for near-duplicates."
        ),
    ] = option_default(NeighboursConfig, "threshold"),
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Write every row found to this CSV file.")
    ] = option_default(NeighboursConfig, "out"),
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights", help="For --query: the weights to embed with, when those the file names are elsewhere now."
        ),
    ] = option_default(NeighboursConfig, "weights"),
    show: Annotated[
        int, typer.Option("--show", help="Rows of the table on screen (all of them go to --out and --json).")
    ] = option_default(NeighboursConfig, "show"),
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", "-b", help="Query images per batch."),
    ] = option_default(NeighboursConfig, "batch_size"),
    workers: WorkersOpt = option_default(NeighboursConfig, "workers"),
    device: DeviceOpt = option_default(NeighboursConfig, "device"),
    precision: PrecisionOpt = option_default(NeighboursConfig, "precision"),
    overwrite: OverwriteOpt = option_default(NeighboursConfig, "overwrite"),
    json_out: JsonOpt = False,
) -> None:
    """The nearest images by cosine similarity: of query images, or the most alike pairs (near-duplicates) of a file."""
    from ..similarity import neighbours as run_neighbours

    config = NeighboursConfig.from_dict(ctx.params)
    with ProgressView(err_console, title="neighbours") as view:
        result = run_neighbours(config, progress=view)
    warn_skipped(result.skipped)
    if json_out:
        print_json(result.to_dict())
        return
    _render_neighbours(result, config.show)


def _render_neighbours(result, show: int) -> None:
    if result.mode == "query":
        title = f"The {result.k} nearest of {result.queries} image(s) among the {result.rows:,} of {result.embeddings}"
    else:
        title = f"The most alike pairs among the {result.rows:,} images of {result.embeddings} (each image's {result.k} nearest)"
    if result.threshold is not None:
        title += f", similarity >= {result.threshold:g}"
    table = Table(title=shown(title), title_justify="left")
    table.add_column("image", overflow="fold")
    table.add_column("rank", justify="right")
    table.add_column("neighbour", overflow="fold")
    table.add_column("similarity", justify="right")
    classes = result.has_classes
    if classes:
        table.add_column("classes")
    for n in result.neighbours[:show]:
        cells = [shown(n.image), str(n.rank), shown(n.neighbour), f"{n.similarity:.4f}"]
        if classes:
            same = n.image_class is not None and n.image_class == n.neighbour_class
            cells.append(
                shown(f"{n.image_class or '?'} / {n.neighbour_class or '?'}") + (" [green]same[/]" if same else "")
            )
        table.add_row(*cells, style="bold" if n.similarity >= 0.9999 else None)
    print_table(table)
    more = len(result.neighbours) - min(show, len(result.neighbours))
    tail = f"{len(result.neighbours):,} row(s) in {result.seconds:.1f}s on {shown(result.device)}"
    if result.out:
        tail += f"; all written to [bold]{shown(str(result.out))}[/]"
    elif more:
        tail += f"; {more:,} more: --out FILE.csv writes them all"
    out_console.print(tail, highlight=False, soft_wrap=True)


@error_boundary
def embeddings_map(
    ctx: typer.Context,
    embeddings: EmbeddingsArg,
    out: Annotated[
        str,
        typer.Option("--out", "-o", help="PNG file to write."),
    ] = option_default(EmbeddingMapConfig, "out"),
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="pca (built in), tsne (needs the tsne extra: scikit-learn) or umap (needs the umap extra: umap-learn).",
        ),
    ] = option_default(EmbeddingMapConfig, "method"),
    thumbnails: Annotated[
        int, typer.Option("--thumbnails", help="Draw the images at this many points spread over the map.")
    ] = option_default(EmbeddingMapConfig, "thumbnails"),
    max_points: Annotated[
        int, typer.Option("--max-points", help="Draw a seeded sample of this many rows when the file has more.")
    ] = option_default(EmbeddingMapConfig, "max_points"),
    seed: Annotated[
        int,
        typer.Option("--seed", help="Seed of the sample, t-SNE and UMAP."),
    ] = option_default(EmbeddingMapConfig, "seed"),
    overwrite: OverwriteOpt = option_default(EmbeddingMapConfig, "overwrite"),
    json_out: JsonOpt = False,
) -> None:
    """A 2-D map of embeddings (PCA; t-SNE or UMAP), coloured by class, optionally with thumbnails (needs matplotlib)."""
    from ..embedding_map import draw_embedding_map

    config = EmbeddingMapConfig.from_dict(ctx.params)
    with ProgressView(err_console, title="map") as view:
        result = draw_embedding_map(config, progress=view)
    if json_out:
        print_json(result.to_dict())
        return
    drawn = (
        f"{result.points:,} of {result.rows:,} points" if result.points < result.rows else f"{result.points:,} points"
    )
    extra = f", {result.classes} classes" if result.classes else ""
    extra += f", {result.thumbnails} thumbnails" if result.thumbnails else ""
    if result.explained_variance:
        extra += f"; the axes hold {100 * sum(result.explained_variance):.1f}% of the variance"
    out_console.print(
        f"wrote [bold]{shown(str(result.out))}[/] ({result.width}x{result.height} px, {drawn}{extra})",
        highlight=False,
        soft_wrap=True,
    )
