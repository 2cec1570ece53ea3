"""Confidences that mean what they say: temperature scaling recovers a known miscalibration,
ECE is computed as defined, and a run's stored temperature is validated when read back."""

from __future__ import annotations

import json

import pytest
import torch

from rotnet_cli import rundir
from rotnet_cli.calibration import calibrate, expected_calibration_error, fit_temperature, temperature_of
from rotnet_cli.errors import WeightsError


def sampled(true_logits: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Labels drawn from softmax(true_logits): logits that are calibrated at T = 1 by construction."""
    return torch.multinomial(true_logits.softmax(1), 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)


@pytest.mark.parametrize("scale", [3.0, 1.6])
def test_an_over_confident_head_recovers_its_temperature(scale):
    """Logits scaled by ``scale`` from calibrated ones: the fitted temperature is ``scale``."""
    generator = torch.Generator().manual_seed(1)
    true_logits = torch.randn(20000, 4, generator=generator) * 2  # (N, 4)
    labels = sampled(true_logits)
    shown = true_logits * scale  # over-confident for scale > 1

    temperature = fit_temperature(shown, labels)

    assert temperature == pytest.approx(scale, rel=0.05)
    fitted = calibrate(shown, labels)
    assert fitted.ece_after < 0.02 < fitted.ece_before  # the fit removes the gap it was built with
    assert fitted.nll_after < fitted.nll_before
    assert fitted.samples == 20000


def test_an_under_confident_head_or_a_perfect_validation_split_is_never_sharpened():
    """T < 1 would be the NLL optimum here; on a validation split the model gets all right the optimum is
    T -> 0 (every answer certain, the wrong ones on new images too). The fit stays at 1."""
    true_logits = torch.randn(5000, 4, generator=torch.Generator().manual_seed(3)) * 2
    assert fit_temperature(true_logits * 0.5, sampled(true_logits)) == 1.0
    perfect = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]] * 14)  # 28 answers, all right
    assert fit_temperature(perfect, perfect.argmax(1)) == 1.0


def test_calibration_never_changes_the_predicted_rotation():
    logits = torch.randn(500, 4, generator=torch.Generator().manual_seed(2)) * 5
    labels = sampled(logits / 5)
    temperature = fit_temperature(logits, labels)
    assert torch.equal((logits / temperature).argmax(1), logits.argmax(1))


def test_ece_by_hand():
    """Two bins: answers at 0.9 (2 right of 2) and at 0.6 (0 right of 2): ECE = 0.5*0.1 + 0.5*0.6."""
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.1 + 0.5 * 0.6)
    # perfectly sure and always right: no gap; a confidence of exactly 1.0 lands in the last bin
    assert expected_calibration_error(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])) == 0.0


def test_too_few_held_out_answers_fit_nothing():
    assert calibrate(torch.randn(4, 4), torch.tensor([0, 1, 2, 3])) is None  # one image at 4 rotations


def test_the_stored_temperature_is_checked_when_read_back(tmp_path):
    def metadata(calibration) -> dict:
        raw = {"rotnet_format": "run", "model": "test_resnet", "calibration": json.dumps(calibration)}
        return rundir.read_weights_metadata(tmp_path / "model.safetensors", raw)

    good = {
        "temperature": 1.7,
        "ece_before": 0.1,
        "ece_after": 0.02,
        "nll_before": 0.5,
        "nll_after": 0.4,
        "samples": 28,
    }
    assert temperature_of(metadata(good)) == 1.7
    assert temperature_of({}) == 1.0  # older runs: the softmax as it was
    for bad in ({**good, "temperature": -1.0}, {**good, "temperature": "hot"}, {**good, "ece_after": 2.0}, [1.7]):
        with pytest.raises(WeightsError, match="calibration"):
            metadata(bad)
