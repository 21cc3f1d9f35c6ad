"""khe_vol.segmentation.labels against scipy.ndimage / numpy on random label images."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from khe_vol.segmentation.labels import label_extrema, label_sums, select_labels


@st.composite
def labelled(draw):
    """A random 3D label image (0 = background, labels 1..n, some absent) and float values."""
    shape = tuple(draw(st.integers(1, 7)) for _ in range(3))
    n = draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labels = rng.integers(0, n + 1, size=shape).astype(np.int32)
    values = rng.normal(100.0, 30.0, size=shape).astype(np.float32)
    keep = rng.random(n) < 0.5
    return labels, n, values, keep


@settings(max_examples=150, deadline=None)
@given(labelled())
def test_label_sums_equal_scipy_sum_labels(case):
    labels, n, values, _ = case
    where = labels > 0
    index = np.arange(1, n + 1)
    # Same summation order as scipy: equal to the last bit, not just close.
    np.testing.assert_array_equal(label_sums(labels, n, where, values),
                                  ndimage.sum_labels(values.astype(np.float64), labels, index))
    np.testing.assert_array_equal(label_sums(labels, n, where), ndimage.sum_labels(np.ones(labels.shape), labels, index))


@settings(max_examples=150, deadline=None)
@given(labelled())
def test_label_extrema_equal_scipy_minimum_maximum(case):
    labels, n, values, _ = case
    lowest, highest = label_extrema(values, labels, n, labels > 0)
    assert lowest.shape == highest.shape == (n,)
    for label in range(1, n + 1):
        if (labels == label).any():
            assert lowest[label - 1] == ndimage.minimum(values, labels, label)
            assert highest[label - 1] == ndimage.maximum(values, labels, label)
        else:  # an absent label has no extrema: +inf / -inf, never a number that looks real
            assert lowest[label - 1] == np.inf and highest[label - 1] == -np.inf


@settings(max_examples=150, deadline=None)
@given(labelled())
def test_select_labels_equals_isin(case):
    labels, n, _, keep = case
    selected = select_labels(labels, keep)
    assert selected.dtype == bool and selected.shape == labels.shape
    np.testing.assert_array_equal(selected, np.isin(labels, np.flatnonzero(keep) + 1))
    assert not selected[labels == 0].any()
