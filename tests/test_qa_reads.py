"""Reads back into the results: final volumes, stale reads, adjudication."""

from __future__ import annotations

import numpy as np
import pytest

from khe_vol.nifti import mask_image, nifti_bytes
from khe_vol.qa.reads import apply_reads
from khe_vol.tables import response_rows

from conftest import make_affine

AFFINE = make_affine((1, 1, 2), (0, 0, 0))
SHAPE = (20, 20, 10)
BASE = "ses-baseline"


def _record(pid, ses, n_voxels):
    return {"participant_id": pid, "session_id": ses, "month": 0 if ses == BASE else 12, "status": "ok",
            "message": None, "method": "auto", "n_voxels": n_voxels, "voxel_volume_mm3": 2.0,
            "volume_ml": n_voxels * 2.0 / 1000, "volume_low_ml": n_voxels * 1.9 / 1000,
            "volume_high_ml": n_voxels * 2.1 / 1000, "shape": list(SHAPE), "affine": AFFINE.tolist()}


def _key(reader, pid, ses, code, sha="p"):
    return {"reader": reader, "case_code": code, "participant_id": pid, "session_id": ses, "status": "case",
            "proposed_mask_sha256": sha}


def _read(reader, code, verdict, mask=None, sha="p", revision=1):
    payload = None if mask is None else nifti_bytes(mask_image(mask, AFFINE))
    return {"reader": reader, "case_code": code, "verdict": verdict, "edited_mask": payload,
            "proposed_mask_sha256": sha, "revision": revision, "comment": ""}


def _box(n_slices):
    mask = np.zeros(SHAPE, bool)
    mask[5:15, 5:15, :n_slices] = True  # 100 voxels per slice
    return mask


@pytest.fixture
def cohort():
    records = [_record("sub-01", BASE, 1000), _record("sub-01", "ses-m12", 500)]
    key = [_key(r, pid, ses, f"{r}{i}") for r in ("R1", "R2")
           for i, (pid, ses) in enumerate((("sub-01", BASE), ("sub-01", "ses-m12")))]
    key += [_key("ADJ", "sub-01", ses, f"ADJ{i}") for i, ses in enumerate((BASE, "ses-m12"))]
    return records, key


def test_no_readers_keeps_the_automatic_volume(cohort):
    records, _ = cohort
    finals, adjudication, edited = apply_reads(records, [], [], [], None, BASE)
    assert [f["qa_status"] for f in finals] == ["not_configured"] * 2
    assert finals[1]["volume_ml"] == records[1]["volume_ml"]
    assert adjudication == {} and edited == []


def test_unread_series_have_no_final_volume(cohort):
    records, key = cohort
    reads = [_read("R1", "R10", "accept")]
    finals, _, _ = apply_reads(records, key, reads, ["R1", "R2"], None, BASE)
    assert finals[0]["qa_status"] == "pending_read" and finals[0]["volume_ml"] is None
    assert "R2" in finals[0]["message"]
    assert finals[0]["volume_auto_ml"] == pytest.approx(2.0)


def test_accept_edit_and_no_residual(cohort):
    records, key = cohort
    reads = [_read("R1", "R10", "accept"), _read("R2", "R20", "accept"),
             _read("R1", "R11", "edited", _box(4)), _read("R2", "R21", "edited", _box(5))]
    finals, adjudication, edited = apply_reads(records, key, reads, ["R1", "R2"], "ADJ", BASE)
    assert adjudication == {}  # -60 % and -50 %: both partial involution
    base, follow = finals
    assert base["qa_status"] == "accepted" and base["volume_ml"] == pytest.approx(2.0)
    assert follow["qa_status"] == "edited" and follow["volume_source"] == "R1:edited"
    assert follow["n_voxels"] == 400 and follow["volume_ml"] == pytest.approx(0.8)
    assert follow["volume_low_ml"] < 0.8 < follow["volume_high_ml"]
    assert [(r, p, s, int(m.sum())) for r, p, s, m in edited] == [
        ("R1", "sub-01", "ses-m12", 400), ("R2", "sub-01", "ses-m12", 500)]
    rows = response_rows(finals, BASE)
    assert rows[0]["category"] == "partial_involution" and rows[0]["percent_change"] == "-60.000"

    reads += [_read("R1", "R11", "no_residual_lesion", revision=2), _read("R2", "R21", "no_residual_lesion", revision=2)]
    finals, _, _ = apply_reads(records, key, reads, ["R1", "R2"], "ADJ", BASE)
    assert finals[1]["volume_ml"] == 0 and response_rows(finals, BASE)[0]["category"] == "complete_involution"


def test_category_disagreement_goes_to_the_adjudicator(cohort):
    records, key = cohort
    reads = [_read("R1", "R10", "accept"), _read("R2", "R20", "accept"),
             _read("R1", "R11", "accept"),  # 500/1000: partial
             _read("R2", "R21", "edited", _box(9))]  # 900/1000: no change
    finals, adjudication, _ = apply_reads(records, key, reads, ["R1", "R2"], "ADJ", BASE)
    assert set(adjudication) == {("sub-01", BASE), ("sub-01", "ses-m12")}
    assert "R1: partial_involution" in adjudication[("sub-01", "ses-m12")]
    assert [f["qa_status"] for f in finals] == ["pending_adjudication"] * 2
    reads += [_read("ADJ", "ADJ0", "accept"), _read("ADJ", "ADJ1", "edited", _box(7))]
    finals, _, _ = apply_reads(records, key, reads, ["R1", "R2"], "ADJ", BASE)
    assert finals[1]["volume_source"] == "ADJ:edited" and finals[1]["n_voxels"] == 700
    assert response_rows(finals, BASE)[0]["category"] == "partial_involution"


def test_stale_and_rejected_reads(cohort):
    records, key = cohort
    reads = [_read("R1", "R10", "accept", sha="old"), _read("R1", "R11", "reject")]
    finals, _, _ = apply_reads(records, key, reads, ["R1"], None, BASE)
    assert finals[0]["qa_status"] == "pending_read" and "another proposed mask" in finals[0]["message"]
    assert finals[1]["qa_status"] == "rejected" and finals[1]["volume_ml"] is None
    assert finals[1]["volume_source"] == "R1:reject"


def test_edited_mask_on_another_grid_is_not_used(cohort):
    records, key = cohort
    wrong = nifti_bytes(mask_image(np.ones((5, 5, 5)), AFFINE))
    reads = [{**_read("R1", "R10", "edited", _box(2)), "edited_mask": wrong}]
    finals, _, _ = apply_reads(records, key, reads, ["R1"], None, BASE)
    assert finals[0]["qa_status"] == "pending_read" and "does not match the series grid" in finals[0]["message"]


def test_a_follow_up_one_reader_rejected_goes_with_its_baseline(cohort):
    # README: a follow-up one reader rejected goes to the adjudicator *with its baseline*.
    records, key = cohort
    reads = [_read("R1", "R10", "accept"), _read("R2", "R20", "accept"),
             _read("R1", "R11", "reject"), _read("R2", "R21", "accept")]
    finals, adjudication, _ = apply_reads(records, key, reads, ["R1", "R2"], "ADJ", BASE)
    assert set(adjudication) == {("sub-01", BASE), ("sub-01", "ses-m12")}
    assert "rejected" in adjudication[("sub-01", "ses-m12")]
    assert "baseline of" in adjudication[("sub-01", BASE)]
    assert [f["qa_status"] for f in finals] == ["pending_adjudication"] * 2


def test_a_baseline_one_reader_rejected_is_adjudicated_alone(cohort):
    records, key = cohort
    reads = [_read("R1", "R10", "reject"), _read("R2", "R20", "accept"),
             _read("R1", "R11", "accept"), _read("R2", "R21", "accept")]
    _, adjudication, _ = apply_reads(records, key, reads, ["R1", "R2"], "ADJ", BASE)
    assert set(adjudication) == {("sub-01", BASE)}


def test_rows_waiting_for_a_read_are_pending_not_errors(cohort):
    # A series nobody has read yet has no final volume, but nothing went wrong with it.
    records, key = cohort
    finals, _, _ = apply_reads(records, key, [_read("R1", "R10", "accept")], ["R1", "R2"], "ADJ", BASE)
    assert [f["qa_status"] for f in finals] == ["pending_read"] * 2
    assert [f["status"] for f in finals] == ["pending"] * 2
    row = response_rows(finals, BASE)[0]
    assert row["status"] == "pending" and row["category"] == "n/a" and "waiting for" in row["message"]


def test_a_rejected_series_is_excluded_not_an_error(cohort):
    records, key = cohort
    finals, _, _ = apply_reads(records, key, [_read("R1", "R10", "accept"), _read("R1", "R11", "reject")],
                               ["R1"], None, BASE)
    assert finals[1]["qa_status"] == "rejected" and finals[1]["status"] == "excluded"
    assert response_rows(finals, BASE)[0]["status"] == "excluded"


def test_a_failed_series_stays_an_error_with_readers(cohort):
    records, key = cohort
    records[1] = {**records[1], "status": "error", "message": "x.nii.gz: truncated"}
    key = [k for k in key if k["session_id"] == BASE]  # no case for the failed series
    finals, _, _ = apply_reads(records, key, [_read("R1", "R10", "accept")], ["R1"], None, BASE)
    assert finals[1]["qa_status"] == "no_case" and finals[1]["status"] == "error"
