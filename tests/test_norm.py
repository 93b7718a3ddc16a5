"""RMSNorm by hand: y = x / sqrt(mean(x^2) + eps) * w."""

import numpy as np
import pytest

from refimpl.norm import rms_norm


def test_rms_norm_hand_value():
    # mean(3^2, 4^2) = 12.5; 1/sqrt(12.5) = 0.28284271...; weights scale each channel
    y = rms_norm(np.array([3.0, 4.0]), np.array([1.0, 2.0]), 0.0)
    np.testing.assert_allclose(y, [3 * 0.28284271247461906, 8 * 0.28284271247461906], rtol=1e-15)


def test_eps_is_added_inside_the_square_root():
    y = rms_norm(np.array([[1e-3, -1e-3]]), np.ones(2), 1e-6)
    assert y[0, 0] == pytest.approx(1e-3 / np.sqrt(1e-6 + 1e-6), rel=1e-14)


def test_normalises_each_row_on_its_own():
    x = np.array([[1.0, 1.0], [10.0, 10.0]])
    np.testing.assert_allclose(rms_norm(x, np.ones(2), 0.0), np.ones((2, 2)), rtol=1e-15)
