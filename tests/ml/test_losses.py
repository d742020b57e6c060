"""Loss terms against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ml import losses


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_bradley_terry_soft_label():
    delta = torch.tensor([2.0, -1.0])
    p = torch.tensor([0.8, 0.3])
    expected = -(
        (0.8 * _log_sigmoid(2.0) + 0.2 * _log_sigmoid(-2.0)) + (0.3 * _log_sigmoid(-1.0) + 0.7 * _log_sigmoid(1.0))
    ) / 2
    assert losses.bradley_terry_loss(delta, p).item() == pytest.approx(expected, rel=1e-6)


def test_bradley_terry_hard_label_equals_log_sigmoid():
    delta = torch.tensor([0.5])
    assert losses.bradley_terry_loss(delta, torch.ones(1)).item() == pytest.approx(-_log_sigmoid(0.5), rel=1e-6)


def test_bradley_terry_margin():
    delta = torch.tensor([1.0])
    expected = -(0.9 * _log_sigmoid(1.0 - 0.5) + 0.1 * _log_sigmoid(-1.0 - 0.5))
    assert losses.bradley_terry_loss(delta, torch.tensor([0.9]), margin=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_hard_labels_threshold():
    assert losses.hard_labels(torch.tensor([0.2, 0.5, 0.51, 1.0])).tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "step, total, alpha, warmup, expected",
    [
        (0, 100, 0.5, 0.2, 0.0),
        (10, 100, 0.5, 0.2, 0.25),
        (20, 100, 0.5, 0.2, 0.5),
        (90, 100, 0.5, 0.2, 0.5),
        (3, 100, 0.5, 0.0, 0.5),
    ],
)
def test_logconf_weight_ramps_linearly(step, total, alpha, warmup, expected):
    assert losses.logconf_weight(step, total, alpha, warmup) == pytest.approx(expected)


def test_logconf_loss_mixes_weak_and_own_labels():
    delta = torch.tensor([1.5, -0.5])
    p = torch.tensor([0.2, 0.9])
    weight = 0.25
    weak = -((0.2 * _log_sigmoid(1.5) + 0.8 * _log_sigmoid(-1.5)) + (0.9 * _log_sigmoid(-0.5) + 0.1 * _log_sigmoid(0.5))) / 2
    own = -(_log_sigmoid(1.5) + _log_sigmoid(0.5)) / 2  # hardened: pair 1 → chosen, pair 2 → rejected
    expected = 0.75 * weak + 0.25 * own
    assert losses.logconf_loss(delta, p, weight).item() == pytest.approx(expected, rel=1e-6)


def test_centering_loss():
    r_c = torch.tensor([1.0, -2.0])
    r_r = torch.tensor([0.5, 1.0])
    assert losses.centering_loss(r_c, r_r, 0.1).item() == pytest.approx(0.1 * (1.5**2 + 1.0**2) / 2)


def test_relative_l2_distance():
    h = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    h0 = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    d = losses.representation_distance(h, h0, "relative_l2")
    assert d.tolist() == pytest.approx([4.0 / 1.0, 25.0 / 25.0], rel=1e-6)


def test_cosine_distance():
    h = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    h0 = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    d = losses.representation_distance(h, h0, "cosine")
    assert d.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_distance_is_scale_free():
    torch.manual_seed(0)
    h0 = torch.randn(4, 16)
    h = h0 + 0.1 * torch.randn(4, 16)
    for kind in ("relative_l2", "cosine"):
        assert torch.allclose(
            losses.representation_distance(h, h0, kind), losses.representation_distance(0.01 * h, 0.01 * h0, kind), rtol=1e-4
        )


def test_unknown_distance_rejected():
    with pytest.raises(ValueError, match="unknown anchor distance 'l1'"):
        losses.representation_distance(torch.ones(1, 2), torch.ones(1, 2), "l1")


def test_anchor_drift_averages_layers():
    h0 = torch.tensor([[1.0, 0.0]])
    layer_a = torch.tensor([[2.0, 0.0]])  # relative distance 1
    layer_b = torch.tensor([[1.0, 0.0]])  # relative distance 0
    assert losses.anchor_drift([layer_a, layer_b], [h0, h0]).tolist() == pytest.approx([0.5])


def test_anchor_penalty_with_tolerance():
    drift = torch.tensor([0.05, 0.3, 0.6])
    assert losses.anchor_penalty(drift, lam=2.0, tau=0.1).item() == pytest.approx(2.0 * (0 + 0.2 + 0.5) / 3)
    assert losses.anchor_penalty(drift, lam=2.0).item() == pytest.approx(2.0 * 0.95 / 3)
    assert losses.anchor_penalty(drift, lam=0.0).item() == 0.0


def test_l2sp_penalty():
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    params0 = [torch.tensor([0.0, 2.0]), torch.tensor([[1.5]])]
    assert losses.l2sp_penalty(params, params0, 0.5).item() == pytest.approx(0.5 * (1.0 + 1.0))
