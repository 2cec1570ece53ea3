"""Fields read from files, validated like user input: a wrong one is an error that names the file."""

from __future__ import annotations

import math
from typing import Any

from ..config import FILE_FIX, MAX_IMG_SIZE, MIN_IMG_SIZE, parse_rotations
from ..errors import ConfigError, WeightsError

# ----------------------------------------------------------------------------- fields read from files


class FileFields:
    """Typed reads of a record that came from a file: a missing field, a wrong type or an
    impossible value is one line that names the file and the field, never a traceback later."""

    def __init__(self, record: dict[str, Any], source: Any, error: type[Exception] = WeightsError):
        self.record, self.source, self.error = record, source, error

    def fail(self, key: str, what: str) -> None:
        value = self.record.get(key)
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise self.error(f"{self.source}: {key!r} is {shown}, not {what}; {FILE_FIX}")

    def missing(self, key: str) -> None:
        raise self.error(f"{self.source} has no {key!r}; {FILE_FIX}")

    def get(self, key: str, required: bool) -> Any:
        if key not in self.record or self.record[key] is None:
            if required:
                self.missing(key)
            return None
        return self.record[key]

    def text(self, key: str, required: bool = True) -> str | None:
        value = self.get(key, required)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            self.fail(key, "a non-empty string")
        return value

    def integer(self, key: str, low: int, high: int | None = None, required: bool = True) -> int | None:
        value = self.get(key, required)
        if value is not None and (not is_int(value) or value < low or (high is not None and value > high)):
            self.fail(key, f"an integer from {low}" + (f" to {high}" if high is not None else " up"))
        return value

    def number(self, key: str, low: float, high: float, required: bool = True) -> float | None:
        value = self.get(key, required)
        if value is not None and (not is_number(value) or not low <= value <= high):
            self.fail(key, f"a number from {low:g} to {high:g}")
        return value

    def channel_stats(self, key: str, positive: bool, required: bool = False) -> tuple[float, ...] | None:
        """mean or std: three finite numbers (std above 0: the images are divided by it)."""
        value = self.get(key, required)
        if value is None:
            return None
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 3
            or not all(is_number(v) for v in value)
            or (positive and not all(v > 0 for v in value))
        ):
            self.fail(key, "3 numbers (one per RGB channel)" + (", each above 0" if positive else ""))
        return tuple(float(v) for v in value)

    def rotations(self, key: str, required: bool = False) -> tuple[float, ...] | None:
        value = self.get(key, required)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(is_number(v) for v in value):
            self.fail(key, "a list of angles in degrees")
        try:
            return parse_rotations(list(value))
        except ConfigError as e:
            raise self.error(f"{self.source}: {key!r} is not a rotation set ({e}); {FILE_FIX}") from None

    def mapping(self, key: str, required: bool = True) -> dict[str, Any] | None:
        value = self.get(key, required)
        if value is not None and not isinstance(value, dict):
            self.fail(key, "an object")
        return value

    def listing(self, key: str, required: bool = True) -> list | None:
        value = self.get(key, required)
        if value is not None and not isinstance(value, list):
            self.fail(key, "a list")
        return value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def img_size_field(fields: FileFields, key: str, required: bool = False) -> int | None:
    return fields.integer(key, MIN_IMG_SIZE, MAX_IMG_SIZE, required=required)


TEMPERATURE_RANGE = (0.05, 20.0)  # calibration.py fits within it: outside, the logits carry no usable signal


def check_calibration_fields(fields: FileFields) -> None:
    """The rotation head's temperature and what it changed (calibration.Calibration.to_dict)."""
    value = fields.mapping("calibration", required=False)
    if value is None:
        return
    inner = FileFields(value, f"{fields.source} calibration", fields.error)
    inner.number("temperature", *TEMPERATURE_RANGE)
    for key in ("ece_before", "ece_after"):
        inner.number(key, 0.0, 1.0)
    for key in ("nll_before", "nll_after"):
        # any finite NLL: a run that diverged writes huge ones (4e10), and its weights must still load
        inner.number(key, 0.0, math.inf)
    inner.integer("samples", 1)


def check_training_images_fields(fields: FileFields) -> None:
    """What the training images looked like (fingerprint.py): sizes, colour, feature statistics."""
    value = fields.mapping("training_images", required=False)
    if value is None:
        return
    inner = FileFields(value, f"{fields.source} training_images", fields.error)
    inner.integer("images", 1)
    inner.integer("side", 1, required=False)
    inner.number("colour", 0.0, 1.0)
    inner.channel_stats("mean", positive=False, required=True)
    inner.channel_stats("std", positive=False, required=True)
    features = inner.mapping("features", required=False)
    if features is None:
        return
    stats = FileFields(features, f"{fields.source} training_images.features", fields.error)
    centre, spread = stats.listing("mean"), stats.listing("std")
    if not centre or len(centre) != len(spread) or not all(is_number(v) for v in centre):
        stats.fail("mean", "a list of numbers as long as 'std'")
    if not all(is_number(v) and v > 0 for v in spread):
        stats.fail("std", "a list of numbers above 0")
    stats.number("threshold", 0.0, 1e6)
    if stats.text("reference", required=False) not in (None, "held-out", "training"):
        stats.fail("reference", "'held-out' or 'training'")
