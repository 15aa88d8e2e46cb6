"""Weighted concatenation identity and PCA-whitening properties."""
import numpy as np
import pytest

from ensemble.combine import concatenate, l2_normalize
from ensemble.whitening import Whitening, fit_whitening


def test_concatenation_cosine_is_weighted_mean_of_member_cosines():
    rng = np.random.default_rng(0)
    members = [l2_normalize(rng.normal(size=(20, d))) for d in (8, 16, 5)]
    weights = [0.5, 2.0, 1.0]
    combined = concatenate(members, weights)
    assert np.allclose(np.linalg.norm(combined, axis=1), 1.0, atol=1e-6)
    expected = sum(w * (m @ m.T) for w, m in zip(weights, members)) / sum(weights)
    assert np.allclose(combined @ combined.T, expected, atol=1e-5)


def test_concatenation_refuses_bad_weights_and_mismatched_members():
    a, b = np.ones((3, 2)), np.ones((4, 2))
    with pytest.raises(ValueError, match="different numbers"):
        concatenate([a, b])
    with pytest.raises(ValueError, match="weights"):
        concatenate([a, a], [1.0, -1.0])


def test_full_whitening_gives_identity_covariance_on_training_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12)) + 3.0
    w = fit_whitening(x, dim=8)
    y = w.apply(x, normalize=False, power=1.0)
    assert np.allclose(np.cov(y, rowvar=False), np.eye(8), atol=1e-4)
    # power 0 keeps the PCA variances: a pure rotation/projection
    y0 = w.apply(x, normalize=False, power=0.0)
    assert np.allclose(np.cov(y0, rowvar=False), np.diag(w.eigenvalues[:8]), rtol=1e-4, atol=1e-6)


def test_whitening_round_trip_and_errors():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 6))
    w = fit_whitening(x, shrinkage=0.1)
    w2 = Whitening.from_arrays(w.to_arrays())
    assert np.array_equal(w.apply(x, power=0.5), w2.apply(x, power=0.5))
    with pytest.raises(ValueError, match="dim"):
        fit_whitening(x, dim=7)
    with pytest.raises(ValueError, match="power"):
        w.apply(x, power=1.5)
    with pytest.raises(ValueError, match="d=6"):
        w.apply(np.ones((2, 4)))


def test_a_whitening_stored_with_its_power_still_loads():
    """Bundles written when the fit also kept a power (now only PostProcessing.whiten_power) still load."""
    x = np.random.default_rng(3).normal(size=(40, 5))
    w = fit_whitening(x, shrinkage=0.1)
    old = Whitening.from_arrays({**w.to_arrays(), "power": np.array(0.25)})
    assert "power" not in w.to_arrays() and np.array_equal(old.apply(x, power=0.5), w.apply(x, power=0.5))
