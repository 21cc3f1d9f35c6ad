"""Overlap of two masks on one grid: the one Dice coefficient of the project.

Used by the reader agreement (``qa_agreement.tsv``), the tests and the
benchmarks alike, so a Dice quoted anywhere is the same number.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from khe_vol.geometry import to_sitk


def cropped_pair(mask_a, mask_b, affine):
    """Both masks cropped to their union's bounding box plus one voxel.

    Overlaps and distances to contours that lie inside that box are
    unchanged by cropping, which keeps them fast on large series grids.

    Parameters
    ----------
    mask_a, mask_b : (I, J, K) ndarray of bool
        Masks on one grid; at least one non-empty.
    affine : (4, 4) ndarray
        Voxel -> RAS+ mm affine of the grid.

    Returns
    -------
    crop_a, crop_b : ndarray of bool
    affine : (4, 4) ndarray
        The affine of the cropped grid (origin moved to the box corner).
    """
    union = np.argwhere(mask_a | mask_b)
    lo = np.maximum(union.min(axis=0) - 1, 0)
    hi = np.minimum(union.max(axis=0) + 2, mask_a.shape)
    box = tuple(slice(int(s), int(e)) for s, e in zip(lo, hi))
    shifted = np.array(affine, dtype=float)
    shifted[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return mask_a[box], mask_b[box], shifted


def dice(mask_a, mask_b):
    """Dice coefficient of two masks on the same grid.

    Computed by SimpleITK's ``LabelOverlapMeasuresImageFilter`` (the method
    ``qa_agreement.tsv`` names). Dice depends on voxel counts only, so the
    grid's geometry does not enter.

    Parameters
    ----------
    mask_a, mask_b : (I, J, K) array_like
        Masks on one grid; non-zero = lesion. At least one must be non-empty.

    Returns
    -------
    float
        ``2 |A & B| / (|A| + |B|)``, dimensionless in [0, 1].

    Raises
    ------
    ValueError
        For two empty masks (Dice is 0/0, undefined) or masks of different shapes.
    """
    a, b = np.asarray(mask_a) != 0, np.asarray(mask_b) != 0
    if a.shape != b.shape:
        raise ValueError(f"masks of shapes {a.shape} and {b.shape} are not on one grid")
    if not (a.any() or b.any()):
        raise ValueError("Dice is undefined for two empty masks")
    a, b, grid = cropped_pair(a, b, np.eye(4))
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(to_sitk(a.astype(np.uint8), grid), to_sitk(b.astype(np.uint8), grid))
    return float(overlap.GetDiceCoefficient())
