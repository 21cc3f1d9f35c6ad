"""Participant pages: every timepoint cut through the same anatomical point, in physical space."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_affine, rotation

from khe_vol.report.participant import (
    Timepoint,
    axial_plane_ras,
    centroid_ras_mm,
    map_points,
    participant_page,
    reference_transforms,
    sample_at_ras,
)

SHAPE = (60, 60, 20)


def ellipsoid(shape, affine, centre_ras, radii_mm, to_body=np.eye(3)):
    """A mask of an ellipsoid (body-frame radii) on a grid; ``to_body`` rotates world into the body frame."""
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3] - centre_ras
    body = xyz @ np.asarray(to_body).T
    return (((body / np.asarray(radii_mm)) ** 2).sum(axis=1) <= 1).reshape(shape)


def rigid(rot, shift):
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = rot, shift
    return m


def test_a_tracked_follow_up_is_cut_through_the_registered_point_not_the_same_indices():
    centre = np.array([5.0, -3.0, 2.0])
    radii = (12.0, 6.0, 8.0)  # not a ball: a rotation shows
    base_affine = make_affine((1.0, 1.0, 3.0), (-30, -30, -28))
    base = ellipsoid(SHAPE, base_affine, centre, radii)
    # The infant lies 25 degrees turned and 15 mm shifted at follow-up; stored on a flipped, permuted grid.
    to_follow = rigid(rotation("z", 25), [15.0, -8.0, 6.0])
    follow_affine = make_affine((1.0, 1.0, 3.0), (30, 30, -25), flips=(-1, -1, 1))
    follow = ellipsoid(SHAPE, follow_affine, map_points(to_follow, centre), radii, rotation("z", 25).T)
    follow_stored = np.transpose(follow, (1, 0, 2))
    follow_affine_stored = follow_affine @ np.eye(4)[[1, 0, 2, 3]]
    records = {"ses-baseline": {"reference_session_id": None},
               "ses-m06": {"reference_session_id": "ses-baseline",
                           # The tracking's convention: the follow-up is fixed, the matrix maps it to the reference.
                           "details": {"registration": {"fixed_to_moving_ras": np.linalg.inv(to_follow).tolist()}}}}
    transforms = reference_transforms(records, "ses-baseline")
    np.testing.assert_array_equal(transforms["ses-baseline"], np.eye(4))
    np.testing.assert_allclose(transforms["ses-m06"], to_follow)
    plane = axial_plane_ras(centroid_ras_mm(base, base_affine), 60.0, 120)
    seen_base = sample_at_ras(base.astype(np.float32), base_affine, plane, order=0) > 0.5
    seen_follow = sample_at_ras(follow_stored.astype(np.float32), follow_affine_stored,
                                map_points(transforms["ses-m06"], plane), order=0) > 0.5
    dice = 2 * (seen_base & seen_follow).sum() / (seen_base.sum() + seen_follow.sum())
    assert dice > 0.9
    # At the same scanner coordinates the follow-up's lesion is somewhere else: the registration matters.
    unregistered = sample_at_ras(follow_stored.astype(np.float32), follow_affine_stored, plane, order=0) > 0.5
    assert 2 * (seen_base & unregistered).sum() / (seen_base.sum() + unregistered.sum()) < 0.5


def test_transforms_chain_through_intermediate_references_and_invert_for_a_later_reference():
    m1, m2 = rigid(rotation("x", 10), [1.0, 2.0, 3.0]), rigid(rotation("z", -7), [0.0, -4.0, 1.0])
    records = {"ses-baseline": {},
               "ses-m06": {"reference_session_id": "ses-baseline",
                           "details": {"registration": {"fixed_to_moving_ras": np.linalg.inv(m1).tolist()}}},
               "ses-m12": {"reference_session_id": "ses-m06",
                           "details": {"registration": {"fixed_to_moving_ras": np.linalg.inv(m2).tolist()}}},
               "ses-m18": {"reference_session_id": None}}  # a reader mask: no registration
    from_base = reference_transforms(records, "ses-baseline")
    np.testing.assert_allclose(from_base["ses-m12"], m2 @ m1)
    assert from_base["ses-m18"] is None
    from_m06 = reference_transforms(records, "ses-m06")
    np.testing.assert_allclose(from_m06["ses-baseline"], np.linalg.inv(m1))
    np.testing.assert_allclose(from_m06["ses-m12"], m2, atol=1e-12)


def test_plane_is_radiological_and_sampling_is_nan_outside():
    plane = axial_plane_ras([0.0, 0.0, 0.0], 10.0, 10)
    assert plane[5, 0, 0] > plane[5, -1, 0]  # column 0: the patient's right (+x)
    assert plane[0, 5, 1] > plane[-1, 5, 1]  # row 0: anterior (+y)
    volume = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    values = sample_at_ras(volume, np.eye(4), np.array([[1.0, 1.0, 1.0], [9.0, 0.0, 0.0]]), order=0)
    assert values[0] == 13 and np.isnan(values[1])


def test_page_html_is_self_contained_and_pdf_reproducible():
    affine = make_affine((1.0, 1.0, 3.0), (-30, -30, -28))
    rng = np.random.default_rng(1)
    timepoints = []
    for sid, month, radius in (("ses-baseline", 0, 10.0), ("ses-m06", 6, 6.0)):
        mask = ellipsoid(SHAPE, affine, np.zeros(3), (radius,) * 3)
        data = (100 + 300 * mask + rng.normal(0, 5, SHAPE)).astype(np.float32)
        timepoints.append(Timepoint(sid, month, data, affine, mask, np.eye(4)))
    timepoints.append(Timepoint("ses-m12", 12, note="no image: truncated file"))
    volumes = [{"participant_id": "sub-03", "session_id": s, "month": m, "volume_ml": v, "volume_low_ml": lo,
                "volume_high_ml": hi, "status": st, "needs_review": nr, "review_reason": rr}
               for s, m, v, lo, hi, st, nr, rr in (("ses-baseline", "0", "4.2", "3.9", "4.6", "ok", "0", "n/a"),
                                                   ("ses-m06", "6", "0.9", "0.8", "1.1", "ok", "1", "wide_band"),
                                                   ("ses-m12", "12", "n/a", "n/a", "n/a", "error", "n/a", "n/a"))]
    response = [{"participant_id": "sub-03", "session_id": "ses-m06", "month": "6", "percent_change": "-78.6",
                 "category": "nearly_complete_involution", "near_threshold": "0", "needs_review": "1",
                 "review_reason": "wide_band", "status": "ok"}]
    timepoints[1].reads = [{"reader": "R1", "case_code": "K7QX2M4P9A", "verdict": "accept", "n_voxels": 900,
                            "revision": 1, "comment": "<script>x</script> $x^{$ is text"}]
    timepoints[2].note = "no image: /site/$a^{$/sub-03_T2w.nii.gz: truncated"
    html, pdf = participant_page("sub-03", timepoints, volumes, response)
    again_html, again_pdf = participant_page("sub-03", timepoints, volumes, response)
    assert (html, pdf) == (again_html, again_pdf)
    assert pdf.startswith(b"%PDF") and b"CreationDate" not in pdf
    assert html.count('src="data:image/png;base64,') == 2 and "http" not in html
    assert "Needs review: wide_band" in html and "nearly_complete_involution" in html
    assert "<h2>Blinded reads</h2>" in html and "&lt;script&gt;" in html and "<script>" not in html
