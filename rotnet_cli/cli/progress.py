"""Rendering library progress events: rich bars on a terminal, plain lines otherwise.

Library functions call ``progress(kind, info)``; this view is that callable. Kinds:
- 'device', 'resume', 'start', 'warning', 'message': one line each;
- 'decode': {'done', 'total'} while images are decoded into memory;
- 'step': {'epoch', 'step', 'steps', 'loss', 'rot_acc', 'images_per_s', 'data_wait'} (pretrain);
- 'epoch': a metrics row (pretrain) -> one line;
- 'task': {'id', 'description', 'done', 'total'} for any other bar (probe, predict, ...).
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


class ProgressView:
    def __init__(self, console: Console, title: str = ""):
        self.console = console
        self.title = title
        self.live = console.is_terminal
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}
        self.epochs = 0

    def __enter__(self) -> "ProgressView":
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def _line(self, text: str) -> None:
        (self.progress.console if self.progress else self.console).print(text, highlight=False, soft_wrap=True)

    def _bar(self, key: str, description: str, done: int, total: int, stats: str = "") -> None:
        if self.progress is None:
            return
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total, stats=stats)
        self.progress.update(self.tasks[key], description=description, completed=done, total=total, stats=stats)

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "device":
            extra = f", {info['world_size']} processes" if info.get("world_size", 1) > 1 else ""
            self._line(f"device: {info['device']}, precision {info['precision']}{extra}")
        elif kind == "resume":
            self._line(f"resuming at epoch {info['epoch'] + 1}, step {info['step']}")
        elif kind == "start":
            self.epochs = info["epochs"]
            self._line(
                f"{info['model']} at {info['img_size']} px: {info['train_images']} training / {info['val_images']} validation "
                f"images, {info['steps_per_epoch']} steps of {info['batch_images']} rotated images per epoch -> {escape(info['out_dir'])}"
            )
        elif kind in ("warning", "message"):
            prefix = "[yellow]warning:[/] " if kind == "warning" else ""
            self._line(prefix + escape(info["message"]))  # library text is plain: brackets in paths stay
        elif kind == "decode":
            self._bar("decode", "decoding images", info["done"], info["total"])
        elif kind == "step":
            stats = (
                f"loss {info['loss']:.4f}  acc {_pct(info['rot_acc'])}  {info['images_per_s']:.0f} img/s  "
                f"data wait {_pct(info['data_wait'])}"
            )
            self._bar("epoch", f"epoch {info['epoch']}/{self.epochs}", info["step"], info["steps"], stats)
        elif kind == "epoch":
            if self.progress is not None and "epoch" in self.tasks:
                self.progress.remove_task(self.tasks.pop("epoch"))
            self._line(
                f"epoch {info['epoch']}/{self.epochs}  loss {info['loss']:.4f}  rot_acc {_pct(info['rot_acc'])}  "
                f"val_rot_acc {_pct(info['val_rot_acc'])}  lr {info['lr']:.4g}  {info['images_per_s']:.0f} img/s  "
                f"{info['seconds']:.1f}s"
            )
        elif kind == "task":
            if self.progress is None:
                if info["done"] == info["total"]:
                    self._line(f"{info['description']}: {info['done']}/{info['total']}")
                return
            self._bar(info["id"], info["description"], info["done"], info["total"], info.get("stats", ""))
