from fractions import Fraction

import numpy as np
import pytest
from conftest import make_affine, rotation, save_nifti

from khe_vol.geometry import voxel_volume_mm3
from khe_vol.nifti import load_image

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


def _header_voxel_volume(tmp_path, name, zooms_mm, degrees, qform_only):
    """Voxel volume of a real NIfTI file with these voxel sizes, as the workflow reads it."""
    affine = make_affine(zooms_mm, (-91.3, 47.9, -12.5), rot=rotation("y", degrees) @ rotation("z", degrees / 2))
    path = save_nifti(tmp_path / name, np.zeros((4, 4, 4), np.int16), affine,
                      sform_code=0 if qform_only else 1)
    return voxel_volume_mm3(load_image(path).affine)


@pytest.mark.parametrize("qform_only", [False, True])
@pytest.mark.parametrize("degrees", [0.0, 17.0])
@pytest.mark.parametrize("zooms_a, zooms_b", [
    ((0.55, 0.55, 4.0), (0.3, 0.7, 3.3)),  # float32 stores none of 0.55, 0.3, 0.7, 3.3 exactly
    ((0.4, 0.4, 0.4), (0.8, 0.8, 0.8)),
    ((0.9, 0.9, 3.5), (0.33, 0.33, 1.1)),
])
@pytest.mark.parametrize("ratio, expected", [
    (Fraction(6, 5), GROWTH), (Fraction(4, 5), PARTIAL), (Fraction(1, 4), NEARLY_COMPLETE)])
def test_float32_header_noise_does_not_flip_a_category(tmp_path, zooms_a, zooms_b, degrees, qform_only,
                                                       ratio, expected):
    """A change of exactly a threshold between two grids read from real headers is that threshold."""
    v_a = _header_voxel_volume(tmp_path, "a.nii", zooms_a, degrees, qform_only)
    v_b = _header_voxel_volume(tmp_path, "b.nii", zooms_b, degrees, qform_only)
    exact_a, exact_b = (Fraction(1) * Fraction(str(x)) * Fraction(str(y)) * Fraction(str(z))
                        for x, y, z in (zooms_a, zooms_b))
    # n_b * v_b / (n_a * v_a) == ratio exactly, in the sizes the headers meant.
    counts = ratio * exact_a / exact_b
    n_a, n_b = counts.denominator, counts.numerator
    assert classify_change(n_a, v_a, n_b, v_b) == (expected, 100 * (ratio - 1))
    # ... and the other way round (baseline on grid b).
    back = ratio * exact_b / exact_a
    assert classify_change(back.denominator, v_b, back.numerator, v_a) == (expected, 100 * (ratio - 1))


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


def _series_record(session, **extra):
    record = {
        "participant_id": "sub-01", "session_id": session, "month": 0 if session == "ses-baseline" else 6,
        "status": "ok", "message": None, "method": "auto", "n_voxels": 1000, "voxel_volume_mm3": 1.0,
        "volume_ml": 1.0, "volume_low_ml": 0.9, "volume_high_ml": 1.1, "mesh_volume_ml": 1.0,
        "max_diameter_cm": 1.5, "affine": np.eye(4).tolist(), "review": [], "seed_source": None,
        "reference_session_id": None,
    }
    return {**record, **extra}


def test_seed_source_says_tracked_for_a_tracked_follow_up():
    from khe_vol.tables import VOLUME_COLUMNS, response_rows, volume_rows

    base = _series_record("ses-baseline", seed_source="seeds_file")
    tracked = _series_record("ses-m06", reference_session_id="ses-baseline")
    waiting = _series_record("ses-m12", status="pending", message="waits", reference_session_id="ses-baseline",
                             reference_needs_seed=True)
    reader_mask = _series_record("ses-m18", method="reader_mask")
    rows = {r["session_id"]: r for r in response_rows([base, tracked, waiting, reader_mask], "ses-baseline")}
    assert (rows["ses-m06"]["baseline_seed_source"], rows["ses-m06"]["seed_source"]) == ("seeds_file", "tracked")
    assert rows["ses-m12"]["seed_source"] == "n/a"  # never tracked: its baseline waits for a seed
    assert rows["ses-m18"]["seed_source"] == "n/a"  # a reader's mask has no seed
    volumes = {r["session_id"]: r["seed_source"] for r in volume_rows([base, tracked, waiting, reader_mask])}
    assert volumes == {"ses-baseline": "seeds_file", "ses-m06": "tracked", "ses-m12": "n/a", "ses-m18": "n/a"}
    assert "tracked" in VOLUME_COLUMNS["seed_source"]["Levels"]
