"""The one JSON parser for what rotnet reads from files: run configs, metrics.jsonl, safetensors headers,
embeddings metadata, --config files.

``json.loads`` recurses once per nesting level, so a 200,000-deep ``[[[...]]]`` raised RecursionError,
which no reader expected ("a bug in rotnet"). Here it is a ValueError like any other malformed JSON,
and every reader already turns a ValueError into its one line naming the file.
"""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read (thousands of levels): not a file rotnet wrote") from None


__all__ = ["loads"]
