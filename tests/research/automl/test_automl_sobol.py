"""Sobol points: exact against scipy's reference and stratified when scrambled."""

import numpy as np
import pytest
from scipy.stats import qmc

from research.automl import sobol_points


@pytest.mark.parametrize("dim", [1, 6, 64])
def test_unscrambled_matches_scipy(dim):
    ours = sobol_points(np.arange(512), dim)
    ref = qmc.Sobol(dim, scramble=False, bits=30).random(512)
    np.testing.assert_array_equal(ours, ref)


def test_scrambled_points_are_stratified_and_reproducible():
    pts = sobol_points(np.arange(128), 8, scramble=True, seed=3)
    for d in range(8):
        assert len(np.unique(np.floor(pts[:, d] * 128))) == 128
    np.testing.assert_array_equal(pts, sobol_points(np.arange(128), 8, scramble=True, seed=3))
    assert not np.array_equal(pts, sobol_points(np.arange(128), 8, scramble=True, seed=4))
    # Points by index equal a slice of the sequence (resume after a restart).
    np.testing.assert_array_equal(pts[50:60], sobol_points(np.arange(50, 60), 8, scramble=True, seed=3))
