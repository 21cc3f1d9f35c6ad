"""``khe-vol check``: every problem in a study, found at once, before a run.

A *problem* stops a series from being measured (or the by-arm step from
running); a *warning* lets the run go on but asks a coordinator to look:
a participant with a baseline and no follow-up yet, or sessions whose dates
run against their months (where dates are known: the ``study_date`` column
of the UID map ``khe-vol import`` writes, or BIDS ``sub-*_sessions.tsv``
``acq_time`` in the imaging folder).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from khe_vol.config import baseline_session
from khe_vol.discover import discover_study, study_missing_visits
from khe_vol.files import read_tsv, tsv_text
from khe_vol.geometry import grids_overlap, seed_voxel
from khe_vol.nifti import SeriesError, load_series, open_image
from khe_vol.plan import SOURCE_NEEDS_SEED, SOURCE_NONE, SOURCE_READER_MASK, SOURCE_SEED, series_plan


def check_study(config, headers_only=False):
    """List the problems of a study.

    Parameters
    ----------
    config : dict
        A validated config (:func:`khe_vol.config.load_config`).
    headers_only : bool
        Skip reading voxel data (no check for truncated data or NaN).

    Returns
    -------
    list of (participant_id or "", session_id or "", problem)
    """
    study = discover_study(config)
    baseline_id = f"ses-{baseline_session(config)}"
    problems = [("", "", p) for p in study.problems]
    participants = sorted({s.participant_id for s in study.slots})
    plans = series_plan(study, baseline_id)
    missing = {}
    for visit in study_missing_visits(study, config["sessions"]):
        missing.setdefault(visit.participant_id, []).append(visit)
    for pid in participants:
        if pid in study.seed_problems:
            problems.append((pid, "", study.seed_problems[pid]))
        slots = [s for s in study.slots if s.participant_id == pid]
        if not any(s.session_id == baseline_id for s in slots):
            problems.append((pid, "", f"no baseline series ({baseline_id}): response cannot be classified"))
        # Visits before the participant's last (the baseline's own row is the one above).
        problems.extend((pid, v.session_id, v.message) for v in missing.get(pid, []) if v.session_id != baseline_id)
        for slot in slots:
            key = (pid, slot.session_id)
            if slot.problem:
                problems.append((pid, slot.session_id, slot.problem))
                continue
            try:
                if headers_only:
                    _, shape, affine, _ = open_image(slot.path)
                else:
                    series = load_series(slot.path)
                    shape, affine = series.data.shape, series.affine
            except SeriesError as exc:
                problems.append((pid, slot.session_id, str(exc)))
                continue
            plan = plans[key]
            if plan.source == SOURCE_SEED and seed_voxel(plan.seed_ras_mm, affine, shape) is None:
                x, y, z = plan.seed_ras_mm
                problems.append((pid, slot.session_id,
                                 f"{slot.path}: seed ({x:.1f}, {y:.1f}, {z:.1f}) RAS+ mm lies outside the image"))
            elif plan.source == SOURCE_READER_MASK:
                problems.extend((pid, slot.session_id, p) for p in _mask_problems(
                    plan.reader_mask, shape, affine, headers_only, slot.session_id == baseline_id))
            elif plan.source == SOURCE_NONE:
                problems.append((pid, slot.session_id,
                                 f"{slot.path}: no seed and no reader mask for {pid}, so nothing to segment from"))
            elif plan.source == SOURCE_NEEDS_SEED:
                problems.append((pid, slot.session_id,
                                 f"{slot.path}: no seed and no reader mask for {pid}: add a seed or a reader mask, "
                                 "or (with readers set) each reader seeds this baseline in the reader app"))
    if config.get("allocation"):
        problems.extend(_allocation_problems(config["allocation"], config.get("arms"), participants))
    return problems


def check_warnings(config, study=None):
    """What lets a run go on but a coordinator should look at.

    Parameters
    ----------
    config : dict
        A validated config.
    study : Study, optional
        :func:`khe_vol.discover.discover_study` of it (found again if omitted).

    Returns
    -------
    list of (participant_id, session_id or "", warning)
    """
    study = study or discover_study(config)
    baseline_id = f"ses-{baseline_session(config)}"
    dates = session_dates(config)
    warnings = []
    for pid in sorted({s.participant_id for s in study.slots}):
        slots = [s for s in study.slots if s.participant_id == pid]
        sessions = {s.session_id for s in slots}
        if sessions == {baseline_id}:
            warnings.append((pid, baseline_id, "baseline only: no follow-up series yet, so no response for "
                                               f"{pid} (expected if the participant's visits are still to come)"))
        dated = sorted((s.month, s.session_id, dates[(pid, s.session_id)]) for s in slots
                       if s.month is not None and (pid, s.session_id) in dates)
        for (m0, ses0, d0), (m1, ses1, d1) in zip(dated, dated[1:]):
            if m1 > m0 and d1 < d0:
                warnings.append((pid, ses1, f"{ses1} (month {m1}) is dated {d1.isoformat()}, before {ses0} "
                                            f"(month {m0}, {d0.isoformat()}): are the session labels swapped?"))
    return warnings


def session_dates(config):
    """Known acquisition dates of sessions, ``{(participant_id, session_id): date}``.

    From the UID map's ``study_date`` (``dicom_uid_map``, else
    ``dicom_uids.tsv`` beside the imaging folder, where ``khe-vol import``
    puts it) and from BIDS ``sub-*/sub-*_sessions.tsv`` (``acq_time``); an
    unreadable value is skipped, not guessed.
    """
    imaging = Path(config["imaging_dir"])
    dates = {}
    uid_map = Path(config.get("dicom_uid_map") or imaging.parent / "dicom_uids.tsv")
    sources = [(uid_map, None, "study_date")] if uid_map.is_file() else []
    sources += [(path, path.name.split("_sessions.tsv")[0], "acq_time")
                for path in sorted(imaging.glob("sub-*/sub-*_sessions.tsv"))]
    for path, pid, column in sources:
        try:
            rows = read_tsv(path)
        except (OSError, ValueError):
            continue
        for row in rows:
            date = _date(row.get(column))
            key = (row.get("participant_id") or pid, row.get("session_id"))
            if date is not None and key[0] and key[1]:
                dates.setdefault(key, date)
    return dates


def _date(text):
    """A date from ``YYYY-MM-DD[Thh:mm:ss]`` or ``YYYYMMDD``; None if it is neither."""
    text = (text or "").strip()
    for candidate, fmt in ((text[:10], "%Y-%m-%d"), (text[:8], "%Y%m%d")):
        try:
            return dt.datetime.strptime(candidate, fmt).date()
        except ValueError:
            continue
    return None


def _allocation_problems(allocation_path, arms, imaged_participants):
    """Participants the allocation and the imaging disagree on, or why the allocation cannot be read."""
    from khe_vol.arms import allocation_mismatches, read_allocation

    try:
        allocation, _ = read_allocation(allocation_path, imaged_participants, arms)
    except (OSError, ValueError) as exc:
        message = str(exc) if str(allocation_path) in str(exc) else f"{allocation_path}: {exc}"
        return [("", "", f"allocation cannot be read, so the by-arm step will fail: {message}")]
    return [(pid, "", f"{allocation_path}: {pid} {what}") for pid, what in allocation_mismatches(allocation, imaged_participants)]


def _mask_problems(mask_path, shape, affine, headers_only, is_baseline=False):
    from khe_vol.reader_masks import is_nrrd
    from khe_vol.series import load_mask_file

    try:
        if headers_only and not is_nrrd(mask_path):
            _, mshape, maffine, _ = open_image(mask_path, "mask")
        else:
            # The workflow's own checks: every format, label values, emptiness.
            mask = load_mask_file(mask_path)
            mshape, maffine = mask.data.shape, mask.affine
            if is_baseline and not mask.data.any():
                return [f"{mask_path}: reader mask is empty (no lesion voxels) at the baseline"]
    except SeriesError as exc:
        return [str(exc)]
    if not grids_overlap(shape, affine, mshape, maffine):
        return [f"{mask_path}: reader mask does not overlap its series"]
    return []


REPORT_COLUMNS = {
    "participant_id": {"LongName": "Participant identifier", "Description": "sub-<label>, or n/a for a problem of the folder as a whole."},
    "session_id": {"LongName": "Session identifier", "Description": "ses-<label>, or n/a for a problem of the participant or folder."},
    "problem": {"LongName": "Problem", "Description": "What is wrong, naming the file; fix it before the run, or expect an error row for that series. For a warning: what to look at."},
    "severity": {"LongName": "Severity", "Description": "problem: the series (or the by-arm step) cannot be measured as it is; warning: the run goes on, a coordinator should look.", "Levels": {"problem": "stops that series or step", "warning": "look, nothing stops"}},
}


def format_report(problems, warnings=()):
    """The problems, then the warnings, as a TSV (participant_id, session_id, problem, severity)."""
    rows = [{"participant_id": pid, "session_id": ses, "problem": msg, "severity": severity}
            for severity, found in (("problem", problems), ("warning", warnings)) for pid, ses, msg in found]
    return tsv_text(REPORT_COLUMNS, rows)
