"""Volumetric response categories, computed exactly.

Volumes are compared as exact rationals built from whole voxel counts and
voxel volumes, so a change of exactly -20 % is partial involution on any
voxel size (plain float arithmetic on mL puts 1000 -> 1200 voxels at 1 mm
isotropic a hair below +20 %).

| category                   | change vs baseline                    |
|----------------------------|---------------------------------------|
| growth                     | increase >= 20 %                      |
| no_change                  | < 20 % increase and < 20 % decrease   |
| partial_involution         | decrease >= 20 % and < 75 %           |
| nearly_complete_involution | decrease >= 75 % and < 100 %          |
| complete_involution        | 100 % decrease (no lesion left)       |
"""

from __future__ import annotations

from fractions import Fraction

GROWTH = "growth"
NO_CHANGE = "no_change"
PARTIAL = "partial_involution"
NEARLY_COMPLETE = "nearly_complete_involution"
COMPLETE = "complete_involution"
CATEGORIES = (GROWTH, NO_CHANGE, PARTIAL, NEARLY_COMPLETE, COMPLETE)
#: Overall lesion response: complete + nearly complete + partial involution.
OVERALL_RESPONSE = frozenset({COMPLETE, NEARLY_COMPLETE, PARTIAL})
#: Good lesion response: complete + nearly complete involution.
GOOD_RESPONSE = frozenset({COMPLETE, NEARLY_COMPLETE})

_GROWTH_RATIO = Fraction(6, 5)  # +20 %
_PARTIAL_RATIO = Fraction(4, 5)  # -20 %
_NEARLY_COMPLETE_RATIO = Fraction(1, 4)  # -75 %

#: Significant digits kept of a voxel volume. Header geometry is float32
#: (about 7 digits), so digits beyond 9 are representation noise, and two
#: grids of equal voxel size must compare equal.
VOXEL_VOLUME_DIGITS = 9


def exact_volume_mm3(n_voxels, voxel_volume_mm3):
    """Lesion volume as an exact rational, in mm^3.

    Parameters
    ----------
    n_voxels : int
        Whole number of lesion voxels.
    voxel_volume_mm3 : float
        Volume of one voxel, taken to :data:`VOXEL_VOLUME_DIGITS` significant digits.

    Returns
    -------
    fractions.Fraction
    """
    if int(n_voxels) != n_voxels or n_voxels < 0:
        raise ValueError(f"n_voxels must be a whole number >= 0, got {n_voxels!r}")
    if not voxel_volume_mm3 > 0:
        raise ValueError(f"voxel_volume_mm3 must be > 0, got {voxel_volume_mm3!r}")
    return int(n_voxels) * Fraction(format(float(voxel_volume_mm3), f".{VOXEL_VOLUME_DIGITS}g"))


def volume_ratio(baseline_mm3, followup_mm3):
    """Follow-up over baseline volume, exact; baseline must be > 0."""
    baseline_mm3, followup_mm3 = Fraction(baseline_mm3), Fraction(followup_mm3)
    if baseline_mm3 <= 0:
        raise ValueError("baseline volume is 0: percent change is undefined")
    return followup_mm3 / baseline_mm3


def percent_change(baseline_mm3, followup_mm3):
    """Exact percent change of volume from baseline (``Fraction``; -100 = gone)."""
    return 100 * (volume_ratio(baseline_mm3, followup_mm3) - 1)


def classify_ratio(ratio):
    """Response category of a follow-up/baseline volume ratio.

    Parameters
    ----------
    ratio : fractions.Fraction or int
        Exact follow-up volume divided by baseline volume (>= 0).

    Returns
    -------
    str
        One of :data:`CATEGORIES`.
    """
    ratio = Fraction(ratio)
    if ratio < 0:
        raise ValueError(f"volume ratio must be >= 0, got {ratio}")
    if ratio == 0:
        return COMPLETE
    if ratio >= _GROWTH_RATIO:
        return GROWTH
    if ratio <= _NEARLY_COMPLETE_RATIO:
        return NEARLY_COMPLETE
    if ratio <= _PARTIAL_RATIO:
        return PARTIAL
    return NO_CHANGE


def classify_change(baseline_n_voxels, baseline_voxel_volume_mm3, n_voxels, voxel_volume_mm3):
    """Category of a follow-up mask against its baseline mask.

    Parameters
    ----------
    baseline_n_voxels, n_voxels : int
        Lesion voxel counts at baseline and follow-up.
    baseline_voxel_volume_mm3, voxel_volume_mm3 : float
        Voxel volumes of each series' own grid, in mm^3.

    Returns
    -------
    category : str
    percent_change : fractions.Fraction
    """
    base = exact_volume_mm3(baseline_n_voxels, baseline_voxel_volume_mm3)
    follow = exact_volume_mm3(n_voxels, voxel_volume_mm3)
    ratio = volume_ratio(base, follow)
    return classify_ratio(ratio), 100 * (ratio - 1)


def is_overall_response(category):
    """1 for complete, nearly complete or partial involution, else 0."""
    return int(category in OVERALL_RESPONSE)


def is_good_response(category):
    """1 for complete or nearly complete involution, else 0."""
    return int(category in GOOD_RESPONSE)
