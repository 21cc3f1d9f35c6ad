"""``khe-vol check``: every problem in a study, found at once, before a run."""

from __future__ import annotations

from khe_vol.config import baseline_session
from khe_vol.discover import discover_study, study_missing_visits
from khe_vol.files import tsv_text
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
    "problem": {"LongName": "Problem", "Description": "What is wrong, naming the file; fix it before the run, or expect an error row for that series."},
}


def format_report(problems):
    """The problems as a TSV (participant_id, session_id, problem)."""
    rows = [{"participant_id": pid, "session_id": ses, "problem": msg} for pid, ses, msg in problems]
    return tsv_text(REPORT_COLUMNS, rows)
