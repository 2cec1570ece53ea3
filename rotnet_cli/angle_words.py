"""One way to say an angle, for predict's table, CSV and JSON alike.

rotnet's numbers are counter-clockwise degrees everywhere (``predicted``: how the image
appears rotated from upright; ``correction``: the turn that makes it upright). The words
say the same thing the way a person would, the short way round: a picture rotated by 270
degrees counter-clockwise is "rotated 90° clockwise", and "to fix: turn 90°
counter-clockwise".
"""

from __future__ import annotations


def _turn(angle: float) -> str | None:
    """'90° counter-clockwise', '90° clockwise', '180°' (the short way round); None for no turn."""
    angle = angle % 360
    if angle == 0:
        return None
    if angle == 180:
        return "180°"
    return f"{angle:g}° counter-clockwise" if angle < 180 else f"{360 - angle:g}° clockwise"


def describe_rotation(predicted: float) -> str:
    """How the image appears rotated from upright: 'upright', '90° clockwise', '180°' ..."""
    return _turn(predicted) or "upright"


def describe_correction(correction: float) -> str:
    """What makes it upright: 'none', 'turn 90° counter-clockwise', 'turn 180°' ..."""
    turn = _turn(correction)
    return f"turn {turn}" if turn else "none"


__all__ = ["describe_rotation", "describe_correction"]
