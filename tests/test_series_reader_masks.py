"""A reader's mask from 3D Slicer (.seg.nrrd, LPS) measured on the series grid."""

from __future__ import annotations

import re

import nrrd
import numpy as np
import pytest
from conftest import save_nifti

from khe_vol.discover import find_masks
from khe_vol.series import measure_series


def test_slicer_segmentation_measured_by_physical_position(tmp_path, ball_series):
    series_path, _, affine, inside = ball_series
    # The same ball stored by Slicer: LPS space, array axes reversed (k, j, i).
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    directions = lps[:, ::-1].T  # one row per (reversed) array axis
    origin_lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]
    data = np.transpose(inside.astype(np.uint8), (2, 1, 0))
    header = {"space": "left-posterior-superior", "space directions": directions, "space origin": origin_lps,
              "Segment0_Name": "lesion", "Segment0_LabelValue": "1", "Segment0_Layer": "0"}
    mask_dir = tmp_path / "masks" / "sub-01" / "ses-baseline" / "anat"
    mask_dir.mkdir(parents=True)
    mask_path = mask_dir / "sub-01_ses-baseline_label-lesion_mask.seg.nrrd"
    nrrd.write(str(mask_path), data, header)

    masks, problems = find_masks(tmp_path / "masks")
    assert problems == [] and masks[("sub-01", "ses-baseline")] == mask_path
    record, mask, _ = measure_series("sub-01", "ses-baseline", 0, series_path, reader_mask_path=mask_path)
    assert record["status"] == "ok", record["message"]
    assert record["method"] == "reader_mask"
    assert record["n_voxels"] == int(inside.sum())
    assert np.array_equal(mask != 0, inside)
    assert record["volume_ml"] == pytest.approx(inside.sum() * 3 / 1000)


# -- every mask format is validated the same way --------------------------------


def _nifti_mask(tmp_path, data, affine, session="baseline", **kwargs):
    path = tmp_path / "masks" / f"sub-01_ses-{session}_label-lesion_mask.nii.gz"
    return save_nifti(path, data, affine, **kwargs)


@pytest.mark.parametrize(("make", "message"), [
    # A probability map (an AI tool's output): 1720 mL for a true 85 mL before.
    (lambda inside, rng: np.where(inside, rng.uniform(0.3, 1.0, inside.shape), rng.uniform(0.0, 0.2, inside.shape))
     .astype(np.float32), r"values between 0 and 1 .*a probability map"),
    # A label map resampled with linear interpolation.
    (lambda inside, rng: (inside * 2.0 + rng.uniform(0, 0.6, inside.shape) * inside).astype(np.float32),
     r"non-integer values .*interpolat"),
    (lambda inside, rng: np.where(inside, 1, -1).astype(np.int16), r"negative values"),
    # The T2 image itself saved under the mask's name.
    (lambda inside, rng: (100 + 200 * inside + rng.normal(0, 5, inside.shape)).astype(np.int16),
     r"\d+ different non-zero values"),
])
def test_nifti_reader_mask_that_is_not_a_label_map_is_an_error(tmp_path, ball_series, make, message):
    series_path, _, affine, inside = ball_series
    mask_path = _nifti_mask(tmp_path, make(inside, np.random.default_rng(3)), affine)
    record, mask, _ = measure_series("sub-01", "ses-baseline", 0, series_path, reader_mask_path=mask_path)
    assert record["status"] == "error" and mask is None
    assert re.search(rf"{re.escape(str(mask_path))}: .*{message}", record["message"]), record["message"]


def test_integer_labels_and_float_binary_masks_are_accepted(tmp_path, ball_series):
    series_path, _, affine, inside = ball_series
    for data, kwargs in ((inside.astype(np.uint8) * 7, {}), (inside.astype(np.float32), {})):
        mask_path = _nifti_mask(tmp_path, data, affine, **kwargs)
        record, mask, _ = measure_series("sub-01", "ses-baseline", 0, series_path, reader_mask_path=mask_path)
        assert record["status"] == "ok", record["message"]
        assert record["n_voxels"] == int(inside.sum())


def _empty_slicer_mask(tmp_path, affine, session):
    path = tmp_path / "masks" / f"sub-01_ses-{session}_label-lesion_mask.seg.nrrd"
    path.parent.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0])
    header = {"space": "left-posterior-superior", "space directions": (lps @ affine[:3, :3]).T,
              "space origin": lps @ affine[:3, 3], "Segment0_Name": "lesion", "Segment0_LabelValue": "1",
              "Segment0_Layer": "0"}
    nrrd.write(str(path), np.zeros((40, 40, 12), np.uint8), header, index_order="F")
    return path


@pytest.mark.parametrize("fmt", ["nifti", "slicer"])
def test_empty_reader_mask_is_an_error_at_baseline_and_zero_at_a_follow_up(tmp_path, ball_series, fmt):
    series_path, _, affine, _ = ball_series

    def empty_mask(session):
        if fmt == "slicer":
            return _empty_slicer_mask(tmp_path, affine, session)
        return _nifti_mask(tmp_path, np.zeros((40, 40, 12), np.uint8), affine, session)

    baseline_mask = empty_mask("baseline")
    record, mask, _ = measure_series("sub-01", "ses-baseline", 0, series_path, reader_mask_path=baseline_mask)
    assert record["status"] == "error" and mask is None
    assert re.search(rf"{re.escape(str(baseline_mask))}: .*empty.*baseline", record["message"]), record["message"]

    # At a follow-up, an empty reader mask is the reader saying the lesion is gone.
    followup_mask = empty_mask("m12")
    record, mask, _ = measure_series("sub-01", "ses-m12", 12, series_path, reader_mask_path=followup_mask)
    assert record["status"] == "ok", record["message"]
    assert record["volume_ml"] == 0 and not mask.any()


def test_follow_up_tracked_from_an_empty_reference_is_an_error(tmp_path, ball_series):
    series_path, _, affine, _ = ball_series
    # A session whose reader drew nothing (0 mL, ok) ...
    empty = _nifti_mask(tmp_path, np.zeros((40, 40, 12), np.uint8), affine, "m06")
    ref_record, ref_mask, _ = measure_series("sub-01", "ses-m06", 6, series_path, reader_mask_path=empty)
    assert ref_record["status"] == "ok" and not ref_mask.any()
    # ... cannot be the reference of a series that holds a lesion: 0 mL there would be a silent wrong answer.
    record, mask, _ = measure_series("sub-01", "ses-m12", 12, series_path,
                                     reference={"record": ref_record, "mask": ref_mask})
    assert record["status"] == "error" and mask is None
    assert re.search(r"reference session ses-m06 .*empty", record["message"]), record["message"]
    assert str(series_path) in record["message"]


def test_khe_vol_check_reports_masks_the_workflow_would_refuse(tmp_path):
    import nibabel as nib

    from tests.cohort import write_mask_cohort
    from tests.test_check import run_check

    config = write_mask_cohort(tmp_path)
    masks = tmp_path / "masks"
    prob = masks / "sub-01/ses-baseline/anat/sub-01_ses-baseline_label-lesion_mask.nii.gz"
    img = nib.load(prob)
    save_nifti(prob, np.asarray(img.dataobj, np.float32) * 0.9, img.affine)  # 0 / 0.9: a probability map
    empty = masks / "sub-02/ses-baseline/anat/sub-02_ses-baseline_label-lesion_mask.nii.gz"
    img = nib.load(empty)
    save_nifti(empty, np.zeros(img.shape, np.uint8), img.affine)
    proc = run_check(config)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("sub-01\tses-baseline\t") and "probability map" in line for line in lines), lines
    assert any(line.startswith("sub-02\tses-baseline\t") and "empty" in line for line in lines), lines
    # An empty follow-up mask (m12: the reader found no lesion) is not a problem.
    assert not any("ses-m12" in line for line in lines), lines
