"""Uncertainty band of a lesion volume, and whether it makes a category uncertain.

A measured volume comes with two kinds of doubt. The *threshold* doubt: the
automatic segmentation, re-run with its intensity threshold moved either way
(:func:`khe_vol.segmentation.band.threshold_band_ml`), gives a smaller and a larger lesion.
The *boundary* doubt: each voxel of the one-voxel shells just inside and just
outside the lesion is only partly lesion, so a fraction of each shell can go
either way (:func:`khe_vol.measure.boundary_shells_ml`). The band is the
envelope of both. A follow-up's category is *near threshold* when some pair
of volumes within the baseline and follow-up bands would classify it
differently.
"""

from __future__ import annotations

from fractions import Fraction

from khe_vol.geometry import voxel_sizes_mm
from khe_vol.measure import boundary_shells_ml
from khe_vol.response import CATEGORIES, classify_ratio

#: Fraction of the inner (outer) boundary shell that may be lost (gained):
#: a quarter of a voxel either way. Calibrated on the phantom benchmark
#: (benchmarks/segmentation.py, 12 participants, 3-5 mm slices): the smallest
#: fraction whose band held every true volume (34/34; 0.15 held 33/34,
#: threshold moves alone 19/34).
BOUNDARY_FRACTION = 0.25

#: Thickest slices of that calibration, mm. Beyond it the share grows with
#: the slice thickness (:func:`boundary_fraction_for`).
CALIBRATED_SLICE_MM = 5.0

#: Categories in increasing order of volume ratio.
_BY_RATIO = tuple(reversed(CATEGORIES))


def boundary_fraction_for(affine):
    """Share of each boundary shell that may change sides on a grid.

    :data:`BOUNDARY_FRACTION` on slices up to :data:`CALIBRATED_SLICE_MM`;
    on thicker slices it grows in proportion to the slice thickness (0.4 at
    8 mm, 0.5 at 10 mm: half a voxel, the most a half-way threshold can
    misplace a partial-volume voxel). Why: a thick slice averages the
    lesion's outline over its whole thickness, so the caps and every edge
    of the outline carry through-plane partial volume that no in-plane edge
    refinement resolves; the shells are also made of thicker voxels, and
    tracked follow-ups overshoot small lesions there (phantoms: 9 mL
    measured 17 mL on 10 mm slices).

    Parameters
    ----------
    affine : (4, 4) array_like
        Voxel-to-world affine, mm.

    Returns
    -------
    float
    """
    thickness_mm = float(voxel_sizes_mm(affine).max())
    return BOUNDARY_FRACTION * max(1.0, thickness_mm / CALIBRATED_SLICE_MM)


def volume_band_ml(mask, affine, resegmented_ml=(), boundary_fraction=None):
    """Lower and upper limits of a lesion volume, in mL.

    Parameters
    ----------
    mask : (I, J, K) array_like
        Non-zero = lesion, on the series' own grid.
    affine : (4, 4) array_like
        Voxel-to-world affine, mm.
    resegmented_ml : sequence of float
        Volumes of the same lesion segmented under perturbed settings, mL.
    boundary_fraction : float, optional
        Share of each one-voxel boundary shell that may change sides;
        default :func:`boundary_fraction_for` the grid.

    Returns
    -------
    volume_low_ml, volume_high_ml : float
        ``low <= volume <= high``; both 0 for an empty mask with no
        perturbed volume above 0.
    """
    from khe_vol.measure import lesion_volume

    share = boundary_fraction_for(affine) if boundary_fraction is None else boundary_fraction
    volume_ml = lesion_volume(mask, affine)["volume_ml"]
    inner_ml, outer_ml = boundary_shells_ml(mask, affine)
    low = min([volume_ml, *resegmented_ml]) - share * inner_ml
    high = max([volume_ml, *resegmented_ml]) + share * outer_ml
    return max(low, 0.0), high


def categories_within(baseline_band_ml, followup_band_ml):
    """Every response category a pair of volume bands allows.

    Parameters
    ----------
    baseline_band_ml, followup_band_ml : (float, float)
        ``(low, high)`` limits of the baseline and follow-up volumes, mL.

    Returns
    -------
    tuple of str
        The categories from the lowest to the highest possible ratio, in
        order of increasing ratio (categories are monotone in the ratio).
    """
    (b_lo, b_hi), (f_lo, f_hi) = (tuple(Fraction(float(v)) for v in band)
                                  for band in (baseline_band_ml, followup_band_ml))
    if not (0 <= b_lo <= b_hi and 0 <= f_lo <= f_hi) or b_hi == 0:
        raise ValueError(f"invalid volume bands: baseline {baseline_band_ml}, follow-up {followup_band_ml}")
    lowest = classify_ratio(f_lo / b_hi)
    if b_lo > 0:
        highest = classify_ratio(f_hi / b_lo)
    else:  # a baseline band reaching 0 allows any ratio, unless nothing is left
        highest = classify_ratio(0) if f_hi == 0 else _BY_RATIO[-1]
    return _BY_RATIO[_BY_RATIO.index(lowest):_BY_RATIO.index(highest) + 1]


def near_threshold(baseline_band_ml, followup_band_ml):
    """1 when the category could flip within the volume bands, else 0."""
    return int(len(categories_within(baseline_band_ml, followup_band_ml)) > 1)
