"""matplotlib for the commands that draw (viz curves, viz embeddings): an optional extra, files only."""

from __future__ import annotations

from typing import Any

from .errors import RotnetError


def pyplot(command: str) -> Any:
    """matplotlib.pyplot on its file-only backend, or one line naming the extra that ``command``
    (e.g. 'rotnet viz curves') needs."""
    try:
        import matplotlib
    except ImportError:
        raise RotnetError(
            f"{command} needs matplotlib: pip install 'rotnet-cli[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt
