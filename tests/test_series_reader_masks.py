"""A reader's mask from 3D Slicer (.seg.nrrd, LPS) measured on the series grid."""

from __future__ import annotations

import nrrd
import numpy as np
import pytest

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
