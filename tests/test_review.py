"""Review flags: a result that may be wrong says so, in the tables and the worklists."""

from __future__ import annotations

import numpy as np
import pytest

from khe_vol.qa.package import build_worklist
from khe_vol.review import REVIEW_REASONS, flag, series_reasons
from khe_vol.tables import response_rows, volume_rows


def _record(session, n_voxels, *, zooms=(0.55, 0.55, 4.0), low=None, high=None, tracked=False, **extra):
    voxel = float(np.prod(zooms))
    volume = n_voxels * voxel / 1000
    return {
        "participant_id": "sub-01",
        "session_id": session,
        "month": 0 if session == "ses-baseline" else 12,
        "status": "ok",
        "message": None,
        "method": "auto",
        "n_voxels": n_voxels,
        "voxel_volume_mm3": voxel,
        "volume_ml": volume,
        "volume_low_ml": volume * 0.95 if low is None else low,
        "volume_high_ml": volume * 1.05 if high is None else high,
        "mesh_volume_ml": volume,
        "max_diameter_cm": 5.0,
        "affine": np.diag([*zooms, 1.0]).tolist(),
        "reference_session_id": "ses-baseline" if tracked else None,
        "review": [],
        **extra,
    }


def _reasons(rec):
    return [r["reason"] for r in series_reasons(rec)]


def test_an_ordinary_series_has_no_reason():
    assert _reasons(_record("ses-baseline", 100_000)) == []


@pytest.mark.parametrize("thickness, flagged", [(4.0, False), (5.0, False), (6.0, True), (10.0, True)])
def test_thick_slices_are_flagged_above_the_documented_limit(thickness, flagged):
    rec = _record("ses-baseline", 100_000, zooms=(0.5, 0.5, thickness))
    assert ("thick_slices" in _reasons(rec)) is flagged


def test_a_band_wider_than_half_the_volume_is_flagged():
    rec = _record("ses-baseline", 100_000)
    assert "wide_band" not in _reasons(rec)
    rec.update(volume_low_ml=0.0, volume_high_ml=2 * rec["volume_ml"])
    assert "wide_band" in _reasons(rec)


def test_every_automatic_zero_found_by_tracking_asks_for_a_reader():
    tracked_zero = _record("ses-m12", 0, tracked=True, low=0.0, high=0.0)
    assert _reasons(tracked_zero) == ["automatic_zero_volume"]
    reader_zero = dict(tracked_zero, method="reader_mask")
    assert _reasons(reader_zero) == []


def test_flag_keeps_one_entry_per_reason_and_refuses_unknown_codes():
    rec = _record("ses-baseline", 1000)
    flag(rec, "seed_not_in_lesion_tissue", "seed intensity 0.2 of the lesion contrast")
    flag(rec, "seed_not_in_lesion_tissue", "again")
    assert rec["review"] == [{"reason": "seed_not_in_lesion_tissue",
                              "detail": "seed intensity 0.2 of the lesion contrast"}]
    with pytest.raises(ValueError, match="unknown review reason"):
        flag(rec, "looks_odd", "")


def test_volumes_table_says_needs_review_until_a_reader_decides():
    zero = _record("ses-m12", 0, tracked=True, low=0.0, high=0.0)
    (row,) = volume_rows([zero])
    assert (row["needs_review"], row["review_reason"]) == ("1", "automatic_zero_volume")
    (read,) = volume_rows([dict(zero, volume_source="R1:no_residual_lesion")])
    # The reader confirmed it: still listed, no longer open.
    assert (read["needs_review"], read["review_reason"]) == ("0", "automatic_zero_volume")
    (clean,) = volume_rows([_record("ses-baseline", 1000)])
    assert (clean["needs_review"], clean["review_reason"]) == ("0", "n/a")


def test_response_table_flags_complete_involution_found_by_tracking_and_the_baselines_doubt():
    base = _record("ses-baseline", 100_000)
    gone = _record("ses-m12", 0, tracked=True, low=0.0, high=0.0)
    (row,) = response_rows([base, gone], "ses-baseline")
    assert row["category"] == "complete_involution"
    assert row["needs_review"] == "1"
    assert "automatic_zero_volume" in row["review_reason"].split(";")

    thick_base = _record("ses-baseline", 100_000, zooms=(0.5, 0.5, 8.0))
    same = _record("ses-m12", 202_000, tracked=True, zooms=(0.5, 0.5, 4.0))  # +1 %
    (row,) = response_rows([thick_base, same], "ses-baseline")
    assert row["category"] == "no_change"
    assert row["review_reason"] == "baseline_needs_review"
    assert row["needs_review"] == "1"


def test_near_threshold_always_asks_for_review():
    base = _record("ses-baseline", 100_000, low=115.0, high=127.0)  # 121 mL
    follow = _record("ses-m12", 81_000, tracked=True)  # -19 %, band reaches past -20 %
    (row,) = response_rows([base, follow], "ses-baseline")
    assert row["near_threshold"] == "1"
    assert row["needs_review"] == "1"
    assert "near_threshold" in row["review_reason"].split(";")


def test_every_reason_is_documented():
    for code, text in REVIEW_REASONS.items():
        assert code.islower() and len(text) > 30


def test_flagged_cases_come_first_in_every_worklist():
    cases = [{
        "participant_id": f"sub-{i:02d}",
        "session_id": "ses-m12",
        "automatic_volume_ml": 10.0,
        "has_proposed_mask": True,
        "overlays": [],
        "review_reasons": ["automatic_zero_volume"] if i in (3, 7) else [],
    } for i in range(10)]
    for reader in ("R1", "R2"):
        worklist, placement = build_worklist(cases, reader, seed=1234)
        first = {e["case_code"] for e in worklist["cases"][:2]}
        assert first == {placement[3]["case_code"], placement[7]["case_code"]}
        assert [e["review_reasons"] for e in worklist["cases"][:2]] == [["automatic_zero_volume"]] * 2


def test_the_summary_counts_what_needs_review_per_reason():
    from khe_vol.summary import review_line

    base = _record("ses-baseline", 1000, review=[{"reason": "seed_on_fluid", "detail": "flat"}])
    follow = _record("ses-m12", 500, tracked=True, review=[{"reason": "seed_on_fluid", "detail": "tracked"}])
    volumes, response = volume_rows([base, follow]), response_rows([base, follow], "ses-baseline")
    line = review_line(volumes, response)
    assert "NEEDS REVIEW: 2 of 2 series (seed_on_fluid 2); 1 of 1 category(ies) (" in line, line
    assert "baseline_needs_review 1" in line and "seed_on_fluid 1" in line, line
    quiet = [_record("ses-baseline", 1000), _record("ses-m12", 500, tracked=True)]
    assert review_line(volume_rows(quiet), response_rows(quiet, "ses-baseline")) == (
        "  needs review: none of 2 series and 1 category(ies)")


def test_a_missing_visit_is_a_row_that_needs_no_review():
    from khe_vol.discover import missing_visits

    records = [_record("ses-baseline", 1000), _record("ses-m12", 500, tracked=True)]
    missing = missing_visits([(r["participant_id"], r["session_id"], r["month"]) for r in records],
                             {"baseline": 0, "m06": 6, "m12": 12, "m24": 24})
    assert [(v.session_id, v.month, v.last_session_id) for v in missing] == [("ses-m06", 6, "ses-m12")]
    rows = volume_rows(records, missing)
    assert [(r["session_id"], r["status"], r["needs_review"]) for r in rows] == [
        ("ses-baseline", "ok", "0"), ("ses-m06", "missing", "0"), ("ses-m12", "ok", "0")]
    rows = response_rows(records, "ses-baseline", missing)
    assert [(r["session_id"], r["status"]) for r in rows] == [("ses-m06", "missing"), ("ses-m12", "ok")]
    assert rows[0]["category"] == "n/a" and rows[0]["baseline_volume_ml"] != "n/a"
