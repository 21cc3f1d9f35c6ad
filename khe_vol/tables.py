"""Cohort tables: volumes.tsv and response.tsv with BIDS-style data dictionaries.

Values are computed from the per-series records; rounding happens only here,
at presentation. Missing values are ``n/a`` (BIDS tabular convention).
"""

from __future__ import annotations

import json

from khe_vol.files import NA, atomic_write_text, write_tsv
from khe_vol.qa import QA_STATUSES
from khe_vol.response import (
    CATEGORIES,
    classify_change,
    is_good_response,
    is_overall_response,
)
from khe_vol.review import REVIEW_REASONS, reader_decided, reason_text, series_reasons

#: ``status`` of a row for an expected visit with no series (:func:`khe_vol.discover.missing_visits`).
MISSING = "missing"
MISSING_TEXT = ("no series: an expected visit (a config session before the participant's last visit with a series) "
                "has no T2w series in imaging_dir; see message")

VOLUME_COLUMNS = {
    "participant_id": {"LongName": "Participant identifier", "Description": "BIDS participant label (sub-<label>)."},
    "session_id": {"LongName": "Session identifier", "Description": "BIDS session label (ses-<label>)."},
    "month": {"LongName": "Month of session", "Description": "Months after baseline, from the config sessions mapping.", "Units": "month"},
    "volume_ml": {"LongName": "Lesion volume", "Description": "Lesion voxel count times voxel volume on the series' own grid.", "Units": "mL"},
    "volume_low_ml": {"LongName": "Lower limit of lesion volume", "Description": "Smallest volume consistent with the measurement: the smaller of the volume and the automatic segmentation re-run with a stricter edge threshold, less a quarter of the one-voxel shell just inside the lesion (see README, Uncertainty band).", "Units": "mL"},
    "volume_high_ml": {"LongName": "Upper limit of lesion volume", "Description": "Largest volume consistent with the measurement: the larger of the volume and the automatic segmentation re-run with a looser edge threshold, plus a quarter of the one-voxel shell just outside the lesion.", "Units": "mL"},
    "n_voxels": {"LongName": "Lesion voxel count", "Description": "Number of lesion voxels on the series' own grid."},
    "voxel_volume_mm3": {"LongName": "Voxel volume", "Description": "|det| of the 3x3 part of the series affine.", "Units": "mm^3"},
    "mesh_volume_ml": {"LongName": "Surface-mesh lesion volume", "Description": "Volume enclosed by the marching-cubes surface of the mask: a cross-check of volume_ml (lower for thin or jagged masks).", "Units": "mL"},
    "max_diameter_cm": {"LongName": "Maximal 3D lesion diameter", "Description": "Largest distance between two points of the lesion surface (maximal tumour dimension).", "Units": "cm"},
    "method": {
        "LongName": "Segmentation method",
        "Description": "Where the lesion mask came from.",
        "Levels": {"auto": "automatic segmentation (seeded, or tracked from the reference session)", "reader_mask": "mask supplied by a reader in masks_dir", "reader_seeded": "a baseline with no seed that the deciding blinded reader seeded (and steered) by clicking in the reader app: that reader's mask"},
    },
    "seed_source": {
        "LongName": "Source of the seed",
        "Description": "Where the seed the lesion was segmented from came from.",
        "Levels": {
            "seeds_file": "the study's seeds table (config seeds)",
            "reader": "a blinded reader seeded this baseline in the reader app (no row in the seeds table): its seed is the reader's first include click and its mask the reader's; each reader's follow-ups are tracked from that reader's own seeded baseline",
            "tracked": "no seed of its own: a follow-up tracked from its reference session (reference_session_id in its record), or from a reader's seeded baseline",
            "n/a": "no seed: a reader mask from masks_dir, or a series still waiting for a seed (a baseline with none, or a follow-up whose baseline has none; see qa_status and message)",
        },
    },
    "volume_auto_ml": {"LongName": "Automatic lesion volume", "Description": "Volume of the automatic (or supplied) mask, before reader QA; volume_ml is the final volume.", "Units": "mL"},
    "volume_source": {"LongName": "Source of the final volume", "Description": "auto or reader_mask without reader QA; with it <reader>:<verdict> of the read that decided (accept: the automatic mask; edited: that reader's mask, kept in derivatives as desc-<reader>; no_residual_lesion: 0 mL)."},
    "qa_status": {"LongName": "Blinded reader QA status", "Description": "Where the series stands in blinded reading.", "Levels": QA_STATUSES},
    "needs_review": {
        "LongName": "Needs a reader's review",
        "Description": "Whether this value may be wrong and no blinded reader has decided it yet: one of review_reason applies. Reader QA puts these series first in each worklist.",
        "Levels": {"1": "look at this series before using its value", "0": "no reason to doubt it, or a reader has decided it"},
    },
    "review_reason": {
        "LongName": "Why the value may be wrong",
        "Description": "Review reasons joined by ';' (n/a: none). Listed even after a reader decided the value.",
        "Levels": REVIEW_REASONS,
    },
    "status": {"LongName": "Status", "Description": "Whether a final volume exists.", "Levels": {"ok": "final volume", "error": "no final volume: the series failed; see message and qa_status", "pending": "no final volume yet: waiting for a blinded reader (a read, a seed or adjudication; see qa_status)", "excluded": "no final volume: the deciding reader rejected the series as unmeasurable", "missing": MISSING_TEXT}},
    "message": {"LongName": "Message", "Description": "Why the series has no volume, naming the file and the problem."},
}

RESPONSE_COLUMNS = {
    "participant_id": VOLUME_COLUMNS["participant_id"],
    "session_id": VOLUME_COLUMNS["session_id"],
    "month": VOLUME_COLUMNS["month"],
    "baseline_volume_ml": {"LongName": "Baseline lesion volume", "Description": "Lesion volume at the month-0 session.", "Units": "mL"},
    "volume_ml": {"LongName": "Follow-up lesion volume", "Description": "Lesion volume at this session.", "Units": "mL"},
    "percent_change": {"LongName": "Percent change of volume", "Description": "100 x (volume - baseline) / baseline, computed exactly from voxel counts.", "Units": "%"},
    "category": {
        "LongName": "Volumetric response category",
        "Description": "Change of volume versus baseline, classified exactly (thresholds inclusive as stated).",
        "Levels": {
            "growth": "increase >= 20%",
            "no_change": "< 20% increase and < 20% decrease",
            "partial_involution": "decrease >= 20% and < 75%",
            "nearly_complete_involution": "decrease >= 75% and < 100%",
            "complete_involution": "100% decrease (no lesion left)",
        },
    },
    "percent_change_low": {"LongName": "Lowest percent change within the volume bands", "Description": "Percent change from the follow-up's lower volume limit and the baseline's upper limit.", "Units": "%"},
    "percent_change_high": {"LongName": "Highest percent change within the volume bands", "Description": "Percent change from the follow-up's upper volume limit and the baseline's lower limit (n/a when the baseline's lower limit is 0).", "Units": "%"},
    "near_threshold": {"LongName": "Category near a threshold", "Description": "Whether a change anywhere between percent_change_low and percent_change_high would give another category: such a category deserves a reader's closer look.", "Levels": {"1": "the category could flip within the volume bands", "0": "the category holds across the bands"}},
    "overall_response": {"LongName": "Overall lesion response", "Description": "Complete, nearly complete or partial involution.", "Levels": {"1": "yes", "0": "no"}},
    "good_response": {"LongName": "Good lesion response", "Description": "Complete or nearly complete involution.", "Levels": {"1": "yes", "0": "no"}},
    "baseline_volume_source": {"LongName": "Source of the baseline volume", "Description": "As volume_source in volumes.tsv, for the baseline."},
    "volume_source": {"LongName": "Source of the follow-up volume", "Description": "As volume_source in volumes.tsv."},
    "baseline_seed_source": {"LongName": "Source of the baseline's seed", "Description": "As seed_source in volumes.tsv, for the baseline (reader: the follow-up was tracked from the deciding reader's own seeded baseline).", "Levels": VOLUME_COLUMNS["seed_source"]["Levels"]},
    "seed_source": {"LongName": "Source of the follow-up's seed", "Description": "As seed_source in volumes.tsv, for the follow-up (tracked when tracked from the baseline).", "Levels": VOLUME_COLUMNS["seed_source"]["Levels"]},
    "needs_review": {
        "LongName": "Needs a reader's review",
        "Description": "Whether this category may be wrong: near_threshold, or a review reason of the follow-up or its baseline that no blinded reader has decided.",
        "Levels": VOLUME_COLUMNS["needs_review"]["Levels"],
    },
    "review_reason": VOLUME_COLUMNS["review_reason"],
    "status": {"LongName": "Status", "Description": "Whether a category could be assigned.", "Levels": {"ok": "classified", "error": "not classified; see message", "pending": "not classified yet: the follow-up or its baseline waits for a blinded reader", "excluded": "not classified: a reader rejected the follow-up or its baseline as unmeasurable", "missing": "not classified: " + MISSING_TEXT}},
    "message": {"LongName": "Message", "Description": "Why no category was assigned."},
}


def _fmt(value, spec=None):
    if value is None:
        return NA
    if spec is None:
        return str(value)
    return format(value, spec)


#: ``seed_source`` of a series tracked from its reference session (the record has none of its own).
SEED_TRACKED = "tracked"


def seed_source(record):
    """The ``seed_source`` cell of a series: its seed's source, ``tracked``, or ``n/a``.

    A record holds ``seed_source`` only for a seed of its own; a follow-up
    tracked from its reference session (``reference_session_id`` set and an
    automatic mask) says ``tracked``, unless the tracking never ran because
    the reference waits for a seed (``reference_needs_seed``: ``n/a``).
    """
    if record.get("seed_source"):
        return str(record["seed_source"])
    if (record.get("reference_session_id") and record.get("method") == "auto"
            and not record.get("reference_needs_seed")):
        return SEED_TRACKED
    return NA


def _with_missing(rows, missing_rows):
    """``rows`` with each missing visit's row placed among its participant's rows by month.

    A missing row goes before the participant's first row of a later month,
    else after the participant's last row (else at the end); other rows keep their order.
    """
    out = list(rows)
    for extra in missing_rows:
        pid, month = extra["participant_id"], int(extra["month"])
        same = [i for i, r in enumerate(out) if r["participant_id"] == pid]
        later = [i for i in same if out[i]["month"] != NA and int(out[i]["month"]) > month]
        at = later[0] if later else (same[-1] + 1 if same else len(out))
        out.insert(at, extra)
    return out


def volume_rows(records, missing=()):
    """volumes.tsv rows (dicts of formatted strings) from per-series records.

    Parameters
    ----------
    records : list of dict
        Per-series records.
    missing : sequence of khe_vol.discover.MissingVisit
        Expected visits with no series: a ``status=missing`` row each.
    """
    rows = []
    for rec in records:
        ok = rec["status"] == "ok"
        rows.append({
            "participant_id": rec["participant_id"],
            "session_id": rec["session_id"],
            "month": _fmt(rec["month"]),
            "volume_ml": _fmt(rec["volume_ml"], ".6f") if ok else NA,
            "volume_low_ml": _fmt(rec.get("volume_low_ml"), ".6f") if ok else NA,
            "volume_high_ml": _fmt(rec.get("volume_high_ml"), ".6f") if ok else NA,
            "n_voxels": _fmt(rec["n_voxels"]) if ok else NA,
            # float32 headers store 0.55 mm as 0.550000012: six decimals keep
            # every real digit and drop that noise.
            "voxel_volume_mm3": _fmt(rec["voxel_volume_mm3"], ".6f") if ok else NA,
            "mesh_volume_ml": _fmt(rec["mesh_volume_ml"], ".6f") if ok else NA,
            "max_diameter_cm": _fmt(rec["max_diameter_cm"], ".2f") if ok else NA,
            "method": _fmt(rec["method"]),
            "seed_source": seed_source(rec),
            "volume_auto_ml": _fmt(_auto_ml(rec), ".6f"),
            "volume_source": _fmt(rec.get("volume_source", rec["method"] if ok else None)),
            "qa_status": rec.get("qa_status", "not_configured"),
            **review_columns(series_reasons(rec), not reader_decided(rec)),
            "status": rec["status"],
            "message": _fmt(rec["message"]),
        })
    blank = dict.fromkeys(VOLUME_COLUMNS, NA)
    return _with_missing(rows, [{**blank, "participant_id": v.participant_id, "session_id": v.session_id,
                                 "month": str(v.month), "needs_review": "0", "status": MISSING,
                                 "message": v.message} for v in missing])


def _auto_ml(rec):
    if "volume_auto_ml" in rec:
        return rec["volume_auto_ml"]
    return rec["volume_ml"] if rec["status"] == "ok" else None


#: How a response row says why a series of it has no volume, by the series' status.
_NOT_FINAL = {"error": "not measured", "pending": "not final yet", "excluded": "excluded"}


def _undecided_status(record):
    """A response row's status from a series with no volume: pending and excluded carry over, else error."""
    return record["status"] if record["status"] in ("pending", "excluded") else "error"


def response_rows(records, baseline_session_id, missing=()):
    """response.tsv rows, one per non-baseline series and per missing follow-up visit.

    Parameters
    ----------
    records : list of dict
        Per-series records of the whole cohort.
    baseline_session_id : str
        ``ses-<label>`` of the month-0 session.
    missing : sequence of khe_vol.discover.MissingVisit
        Expected visits with no series: a ``status=missing`` row each (but the baseline).
    """
    baselines = {r["participant_id"]: r for r in records if r["session_id"] == baseline_session_id}
    rows = []
    for rec in records:
        if rec["session_id"] == baseline_session_id:
            continue
        base = baselines.get(rec["participant_id"])
        row = {
            "participant_id": rec["participant_id"],
            "session_id": rec["session_id"],
            "month": _fmt(rec["month"]),
            "baseline_volume_ml": _fmt(base["volume_ml"], ".6f") if base and base["status"] == "ok" else NA,
            "volume_ml": _fmt(rec["volume_ml"], ".6f") if rec["status"] == "ok" else NA,
            "percent_change": NA,
            "category": NA,
            "percent_change_low": NA,
            "percent_change_high": NA,
            "near_threshold": NA,
            "overall_response": NA,
            "good_response": NA,
            "baseline_volume_source": _fmt(base.get("volume_source", base.get("method"))) if base and base["status"] == "ok" else NA,
            "volume_source": _fmt(rec.get("volume_source", rec.get("method"))) if rec["status"] == "ok" else NA,
            "baseline_seed_source": seed_source(base) if base else NA,
            "seed_source": seed_source(rec),
            "needs_review": NA,
            "review_reason": NA,
            "status": "error",
            "message": NA,
        }
        if rec["status"] != "ok":
            row["status"] = _undecided_status(rec)
            row["message"] = f"follow-up {_NOT_FINAL[row['status']]}: {rec['message']}"
        elif base is None:
            row["message"] = f"no baseline series ({baseline_session_id}) for {rec['participant_id']}"
        elif base["status"] != "ok":
            row["status"] = _undecided_status(base)
            row["message"] = f"baseline {_NOT_FINAL[row['status']]}: {base['message']}"
        elif base["n_voxels"] == 0:
            row["message"] = "baseline volume is 0 mL, so percent change is undefined"
        else:
            category, change = classify_change(
                base["n_voxels"], base["voxel_volume_mm3"], rec["n_voxels"], rec["voxel_volume_mm3"]
            )
            row.update(
                percent_change=format(float(change), ".3f"),
                category=category,
                **_band_columns(base, rec),
                overall_response=str(is_overall_response(category)),
                good_response=str(is_good_response(category)),
                status="ok",
            )
            row.update(_response_review(base, rec, row["near_threshold"] == "1"))
        rows.append(row)
    blank = dict.fromkeys(RESPONSE_COLUMNS, NA)
    extra = []
    for visit in missing:
        if visit.session_id == baseline_session_id:
            continue  # its follow-ups' rows say "no baseline series"
        base = baselines.get(visit.participant_id)
        extra.append({**blank, "participant_id": visit.participant_id, "session_id": visit.session_id,
                      "month": str(visit.month),
                      "baseline_volume_ml": _fmt(base["volume_ml"], ".6f") if base and base["status"] == "ok" else NA,
                      "status": MISSING, "message": f"follow-up visit missing: {visit.message}"})
    return _with_missing(rows, extra)


def review_columns(reasons, open_):
    """``needs_review`` and ``review_reason`` cells from a list of reasons.

    ``open_`` is False when a blinded reader has decided the value, so the
    reasons stay listed but no longer ask for a review.
    """
    return {"needs_review": str(int(bool(reasons) and open_)), "review_reason": _fmt(reason_text(reasons))}


def _response_review(base, rec, near):
    """Review cells of a classified follow-up: its own reasons, its baseline's, near_threshold."""
    own, base_reasons = series_reasons(rec), series_reasons(base)
    open_ = bool(own) and not reader_decided(rec)
    reasons = list(own)
    if base_reasons:
        reasons.append({"reason": "baseline_needs_review", "detail": reason_text(base_reasons)})
        open_ = open_ or not reader_decided(base)
    if near:
        reasons.append({"reason": "near_threshold", "detail": "category could flip within the bands"})
        open_ = True
    reasons.sort(key=lambda item: item["reason"])
    return review_columns(reasons, open_)


def _band_columns(base, rec):
    """percent_change_low/high and near_threshold from the two volume bands."""
    # Imported here: khe_vol.segmentation.uncertainty loads the measurement stack (SimpleITK,
    # scikit-image), which the table and report commands never need otherwise.
    from khe_vol.segmentation.uncertainty import near_threshold

    base_band = (base["volume_low_ml"], base["volume_high_ml"])
    band = (rec["volume_low_ml"], rec["volume_high_ml"])
    if None in base_band or None in band:
        return {}
    low = 100 * (band[0] / base_band[1] - 1)
    high = 100 * (band[1] / base_band[0] - 1) if base_band[0] > 0 else None
    return {
        "percent_change_low": _fmt(low, ".3f"),
        "percent_change_high": _fmt(high, ".3f"),
        "near_threshold": str(near_threshold(base_band, band)),
    }


def write_table(path, columns, rows, provenance=None):
    """Write a TSV and its JSON data dictionary beside it (``.json``), atomically.

    ``provenance`` (software versions, config, inputs; see
    :mod:`khe_vol.report.provenance`) goes into the dictionary under ``GeneratedBy``
    and ``Provenance``, beside the column entries.
    """
    # Tabs and line breaks would break the table; messages keep their words.
    write_tsv(path, columns, rows)
    dictionary = dict(columns)
    if provenance is not None:
        dictionary["GeneratedBy"] = provenance["GeneratedBy"]
        dictionary["Provenance"] = {k: v for k, v in provenance.items() if k != "GeneratedBy"}
    atomic_write_text(str(path)[: -len(".tsv")] + ".json", json.dumps(dictionary, indent=2) + "\n")


assert set(RESPONSE_COLUMNS["category"]["Levels"]) == set(CATEGORIES)
