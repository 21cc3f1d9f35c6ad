"""Per-label statistics over the labelled voxels only.

scipy.ndimage's ``sum_labels`` / ``minimum`` / ``maximum`` pass over the whole box
each call and were a fifth of a series job; these give the same numbers (same
summation order) touching the labelled voxels only.
"""

from __future__ import annotations

import numpy as np


def select_labels(labels, keep):
    """Voxels whose label is kept; ``keep`` is a bool per label 1..n (background is never kept)."""
    return np.concatenate([[False], np.asarray(keep, bool)])[labels]


def label_sums(labels, n, where, weights=None):
    """Per-label sums of ``weights`` (counts when None) for labels 1..n.

    ``where`` is the boolean mask of the labelled voxels (``labels > 0``),
    passed in because callers already hold it.
    """
    values = None if weights is None else np.asarray(weights, np.float64)[where]
    return np.bincount(labels[where], values, minlength=n + 1)[1:]


def label_extrema(values, labels, n, where):
    """Per-label minimum and maximum of ``values`` for labels 1..n (``where`` as in label_sums)."""
    lab, v = labels[where], np.asarray(values)[where]
    lowest = np.full(n + 1, np.inf)
    highest = np.full(n + 1, -np.inf)
    np.minimum.at(lowest, lab, v)
    np.maximum.at(highest, lab, v)
    return lowest[1:], highest[1:]
