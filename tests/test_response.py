from fractions import Fraction

import pytest

from khe_vol.response import (
    COMPLETE,
    GROWTH,
    NEARLY_COMPLETE,
    NO_CHANGE,
    PARTIAL,
    classify_change,
    classify_ratio,
    exact_volume_mm3,
    is_good_response,
    is_overall_response,
)


@pytest.mark.parametrize(
    "baseline, followup, expected",
    [
        (1000, 1200, GROWTH),  # exactly +20 %
        (1000, 1199, NO_CHANGE),
        (1000, 801, NO_CHANGE),
        (1000, 800, PARTIAL),  # exactly -20 %
        (1000, 251, PARTIAL),
        (1000, 250, NEARLY_COMPLETE),  # exactly -75 %
        (1000, 1, NEARLY_COMPLETE),
        (1000, 0, COMPLETE),
        (1000, 5000, GROWTH),
    ],
)
def test_thresholds_exact_on_voxel_counts(baseline, followup, expected):
    category, change = classify_change(baseline, 1.0, followup, 1.0)
    assert category == expected
    assert change == Fraction(100 * (followup - baseline), baseline)


def test_float_arithmetic_would_misclassify_but_we_do_not():
    # The float route: percent change of 1.2 mL over 1.0 mL is a hair below 20.
    baseline_ml, followup_ml = 1000 * 1.0 / 1000, 1200 * 1.0 / 1000
    assert not 100 * (followup_ml - baseline_ml) / baseline_ml >= 20
    assert classify_change(1000, 1.0, 1200, 1.0)[0] == GROWTH


@pytest.mark.parametrize("voxel_mm3", [0.55 * 0.55 * 4.0, 0.5 * 0.5 * 3.0, 0.7 * 0.7 * 5.0, 1.21, 0.1 * 0.3 * 3])
@pytest.mark.parametrize("factor, expected", [(Fraction(6, 5), GROWTH), (Fraction(4, 5), PARTIAL), (Fraction(1, 4), NEARLY_COMPLETE)])
def test_thresholds_exact_on_any_voxel_size(voxel_mm3, factor, expected):
    n0 = 2000
    n1 = int(n0 * factor)
    assert classify_change(n0, voxel_mm3, n1, voxel_mm3)[0] == expected


def test_thresholds_exact_across_different_grids():
    # Baseline 1000 voxels of 0.5x0.5x4 = 1.0 mm^3; follow-up on 0.5x0.5x3 = 0.75 mm^3.
    v0 = 0.5 * 0.5 * 4.0
    v1 = 0.5 * 0.5 * 3.0
    assert classify_change(1500, v0, 1600, v1)[0] == PARTIAL  # 1200/1500 = 0.8 exactly
    assert classify_change(1500, v0, 2400, v1)[0] == GROWTH  # 1800/1500 = 1.2 exactly
    assert classify_change(1500, v0, 500, v1)[0] == NEARLY_COMPLETE  # 375/1500 = 0.25
    # float32 header noise on the voxel volume must not flip a category
    v1_noisy = float(__import__("numpy").float32(0.5)) ** 2 * float(__import__("numpy").float32(3.0))
    assert classify_change(1500, v0, 1600, v1_noisy)[0] == PARTIAL


def test_response_flags():
    assert [is_overall_response(c) for c in (GROWTH, NO_CHANGE, PARTIAL, NEARLY_COMPLETE, COMPLETE)] == [0, 0, 1, 1, 1]
    assert [is_good_response(c) for c in (GROWTH, NO_CHANGE, PARTIAL, NEARLY_COMPLETE, COMPLETE)] == [0, 0, 0, 1, 1]


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        classify_change(0, 1.0, 10, 1.0)  # baseline 0: undefined
    with pytest.raises(ValueError):
        exact_volume_mm3(10.5, 1.0)
    with pytest.raises(ValueError):
        classify_ratio(-1)
