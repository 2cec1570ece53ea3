"""Confidences that mean what they say: temperature scaling of the rotation head.

A network trained with cross-entropy is usually over-confident: of the answers it gives
at 0.95, fewer than 95% are right. Temperature scaling (Guo et al., 2017) divides the
logits by one number T > 0, fitted on held-out images by minimising the negative
log-likelihood; the predicted angle never changes (argmax is unchanged), only how sure
the model says it is. ``fit_temperature`` fits T on the validation split's logits (which
pretraining already computes in its last validation pass), and ``expected_calibration_error``
measures how far the confidences are from the accuracy they claim, before and after.

A run stores the result as the ``calibration`` field of its model.safetensors metadata
(``Calibration.to_dict``); predict divides the logits by ``temperature`` before the
softmax. Weights without it (older runs, kept checkpoints, exports) use T = 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .rundir import TEMPERATURE_RANGE

ECE_BINS = 15  # the usual choice (Guo et al.); equal-width confidence bins
# The fit only ever softens. A small validation split the model gets all right has no finite
# NLL optimum (T -> 0 makes every answer certain): measured on 70 faces, 7 held out, the fit
# ran to the lower bound and every answer, the wrong ones too, came out at 100%. A few
# held-out images cannot prove a model surer than its own softmax says.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1.0, TEMPERATURE_RANGE[1]
NOTABLE_ECE = 0.02  # an error below this is within the noise of a few hundred held-out answers
MIN_CALIBRATION_IMAGES = 2  # held-out images (each seen at every rotation) needed to fit anything


@dataclass(frozen=True)
class Calibration:
    """The fitted temperature and what it changed, measured on ``samples`` held-out logits."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    samples: int  # rotated copies of the held-out images (images x rotations)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """(N, C) probabilities, (N,) labels -> ECE: sum over equal-width confidence bins of
    (fraction of answers in the bin) x |accuracy in the bin - mean confidence in the bin|."""
    if len(labels) == 0:
        return 0.0
    confidence, predicted = probs.float().max(1)  # (N,), (N,)
    correct = (predicted == labels).float()
    # confidence 1.0 belongs to the last bin; bin b holds (b/bins, (b+1)/bins]
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1  # (N,)
    conf_sum = torch.bincount(index, weights=confidence, minlength=bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=bins)
    return float((conf_sum - correct_sum).abs().sum() / len(labels))


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return float(F.cross_entropy(logits / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T minimising the NLL of softmax(logits / T): LBFGS on log T (so T stays positive).

    (N, C) float logits, (N,) int64 labels; at most a few thousand rows, so on the CPU in
    milliseconds. Clamped to [MIN_TEMPERATURE, MAX_TEMPERATURE] (never sharper than the softmax:
    see MIN_TEMPERATURE); 1.0 when nothing can be fitted.
    """
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    if len(labels) == 0 or not torch.isfinite(logits).all():
        return 1.0
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        return 1.0
    return min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)


def calibrate(logits: torch.Tensor, labels: torch.Tensor) -> Calibration | None:
    """Fit the temperature on held-out (N, C) logits and measure ECE and NLL before and after.
    None when there are too few held-out answers to fit one."""
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    num_classes = logits.shape[1] if logits.ndim == 2 else 1
    if len(labels) < MIN_CALIBRATION_IMAGES * num_classes or not torch.isfinite(logits).all():
        return None
    temperature = fit_temperature(logits, labels)
    return Calibration(
        temperature=temperature,
        ece_before=expected_calibration_error(logits.softmax(1), labels),
        ece_after=expected_calibration_error((logits / temperature).softmax(1), labels),
        nll_before=_nll(logits, labels, 1.0),
        nll_after=_nll(logits, labels, temperature),
        samples=len(labels),
    )


def temperature_of(info: dict) -> float:
    """The temperature stored in weights metadata (checked by rundir's reader); 1.0 without one."""
    calibration = info.get("calibration")
    return float(calibration["temperature"]) if isinstance(calibration, dict) else 1.0


__all__ = [
    "Calibration",
    "calibrate",
    "expected_calibration_error",
    "fit_temperature",
    "temperature_of",
    "ECE_BINS",
    "MIN_TEMPERATURE",
    "MAX_TEMPERATURE",
]
