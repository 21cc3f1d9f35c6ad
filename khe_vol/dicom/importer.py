"""``khe-vol import``: a site's DICOM export into the imaging folder, de-identified, with a UID map kept outside.

Per study (one visit): match it to a participant and session
(:mod:`khe_vol.dicom.visits`), choose its T2 series (:mod:`khe_vol.dicom.select`),
check the series is one evenly spaced stack (:func:`khe_vol.dicom.series.geometry_problems`),
convert it with dcm2niix (the PyPI package's binary) in a temporary folder,
check dcm2niix's NIfTI against the DICOM (one volume; every DICOM voxel lands
on a NIfTI voxel at the same physical position with the same value), blank
the NIfTI's free text, keep only acquisition parameters in the JSON sidecar,
scan both for every identifying value of the study, and write them
atomically to ``sub-X/ses-Y/anat/sub-X_ses-Y_T2w.nii.gz`` (+ ``.json``).
A study with a problem is reported and not converted; the others are.

Outside the imaging folder: the UID map (:data:`UID_MAP_COLUMNS`, the link
back to the DICOM for the SEG / SR export; merged with an earlier map, one
row per participant x session) and ``import_report.tsv`` (every series of
every study, whether it was a T2 candidate and why, which was chosen, and
what happened).
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from khe_vol.dicom.select import choose_t2, judge_series, series_rule
from khe_vol.dicom.series import geometry_problems, grid_affine_ras, scan_folder
from khe_vol.dicom.visits import Study, match_by_month_window, match_by_table, read_visits
from khe_vol.files import atomic_write_bytes, atomic_write_text, read_tsv, write_tsv

#: Columns of the UID map (the contract with the DICOM export).
UID_MAP_COLUMNS = ("participant_id", "session_id", "nifti", "dicom_dir", "dicom_files", "study_instance_uid",
                   "series_instance_uid", "frame_of_reference_uid", "series_description", "study_date")

#: Columns of import_report.tsv, with what each means (written as import_report.json).
REPORT_COLUMNS = {
    "participant_id": "participant the study was matched to (n/a: none)",
    "session_id": "session the study was matched to (n/a: none)",
    "study_instance_uid": "the DICOM study",
    "series_number": "SeriesNumber",
    "series_description": "SeriesDescription (else ProtocolName)",
    "series_instance_uid": "the DICOM series",
    "n_files": "DICOM files of the series",
    "candidate": "1 if the series rule takes it for a T2 series, else 0",
    "reason": "why the rule took or left it",
    "chosen": "1 for the series converted (or that would have been) for the study",
    "study_status": "converted, unchanged (the same file was already there) or failed (nothing written for the study)",
    "message": "what went wrong for the study, or notes on its conversion",
}

#: JSON sidecar keys kept from dcm2niix's sidecar: acquisition parameters only. Manufacturer and model
#: stay (they identify no one and matter for harmonisation); institution, station, serial number,
#: descriptions (free text), dates, times and UIDs do not.
SIDECAR_KEYS = (
    "Modality", "MagneticFieldStrength", "Manufacturer", "ManufacturersModelName", "PatientPosition",
    "MRAcquisitionType", "ScanningSequence", "SequenceVariant", "ScanOptions", "PulseSequenceType", "ImageType",
    "SliceThickness", "SpacingBetweenSlices", "EchoTime", "RepetitionTime", "InversionTime", "FlipAngle",
    "EchoTrainLength", "PixelBandwidth", "PercentPhaseFOV", "PercentSampling", "AcquisitionMatrixPE",
    "ReconMatrixPE", "PhaseEncodingAxis", "ConversionSoftware",
)

#: Largest distance (voxels) of a DICOM voxel from a NIfTI voxel centre still "the same voxel":
#: positions in DICOM are rounded decimals.
GRID_TOL_VOXELS = 0.05


class DicomImportError(ValueError):
    """The import cannot start (paths, visits table, config); the message names the file and the problem."""


class _StudyFailed(Exception):
    """One study cannot be converted; the message says why."""


@dataclass
class StudyOutcome:
    """What happened to one study."""

    study_instance_uid: str
    participant_id: str | None
    session_id: str | None
    status: str
    message: str = ""
    series: list = field(default_factory=list)
    verdicts: list = field(default_factory=list)
    chosen: object = None
    nifti: str | None = None


def dcm2niix_binary():
    """Path of the dcm2niix binary: the PyPI ``dcm2niix`` package's, else one on PATH."""
    try:
        import dcm2niix

        if Path(dcm2niix.bin).is_file():
            return dcm2niix.bin
    except ImportError:
        pass
    found = shutil.which("dcm2niix")
    if found is None:
        raise DicomImportError("dcm2niix not found: install the khe-vol dependencies (pip install dcm2niix)")
    return found


def default_uid_map_path(imaging_dir):
    """``<parent of imaging_dir>/dicom_uids.tsv``: outside the imaging folder, like the blinding key."""
    return Path(imaging_dir).resolve().parent / "dicom_uids.tsv"


def _inside(path, folder):
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


# ---------------------------------------------------------------- conversion and its checks


def _frame_pixels(ds, frame_index):
    """Rescaled pixel values of one frame (rows x columns), float64."""
    arr = ds.pixel_array
    if arr.ndim == 3 or int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[frame_index]
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None and "PerFrameFunctionalGroupsSequence" in ds:
        for group in (ds.PerFrameFunctionalGroupsSequence[frame_index],
                      *(ds.SharedFunctionalGroupsSequence if "SharedFunctionalGroupsSequence" in ds else [])):
            if "PixelValueTransformationSequence" in group:
                item = group.PixelValueTransformationSequence[0]
                slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
                break
    return arr.astype(np.float64) * float(slope if slope is not None else 1) + float(intercept or 0)


def dicom_volume(dicom_dir, series):
    """The series' rescaled values as a (columns, rows, slices) array on :func:`grid_affine_ras`'s grid."""
    cache = {}
    planes = []
    for frame in series.frames:
        if frame.file not in cache:
            cache.clear()  # one file open at a time: a multi-frame file holds every frame
            cache[frame.file] = pydicom.dcmread(Path(dicom_dir) / frame.file)
        planes.append(_frame_pixels(cache[frame.file], frame.index).T)
    return np.stack(planes, axis=2)


def check_against_dicom(img, grid_affine, grid_shape, volume):
    """Whether dcm2niix's image holds the DICOM voxels at their physical positions.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        dcm2niix's output.
    grid_affine : (4, 4) ndarray
        Voxel -> RAS+ of the DICOM grid (:func:`grid_affine_ras`).
    grid_shape : tuple of 3 int
        (columns, rows, slices).
    volume : (C, R, S) ndarray or None
        DICOM values (None: geometry only).

    Returns
    -------
    str or None
        The disagreement, or None.
    """
    if sorted(img.shape) != sorted(grid_shape):
        return f"dcm2niix wrote a {img.shape} image for {grid_shape} DICOM voxels (columns, rows, slices)"
    m = np.linalg.inv(img.affine) @ grid_affine
    perm = np.round(m[:3, :3])
    if (np.abs(m[:3, :3] - perm).max() > GRID_TOL_VOXELS or sorted(np.abs(perm).sum(axis=0)) != [1, 1, 1]
            or np.abs(m[:3, 3] - np.round(m[:3, 3])).max() > GRID_TOL_VOXELS):
        return "dcm2niix's NIfTI places the voxels elsewhere than the DICOM positions say"
    ijk = np.indices(grid_shape).reshape(3, -1)
    idx = (perm @ ijk + np.round(m[:3, 3])[:, None]).astype(int)
    if (idx < 0).any() or (idx >= np.array(img.shape[:3])[:, None]).any():
        return "dcm2niix's NIfTI does not cover the DICOM grid"
    if volume is None:
        return None
    data = np.asanyarray(img.dataobj, dtype=np.float64)[idx[0], idx[1], idx[2]]
    expected = volume.reshape(-1)
    tol = 1e-4 * max(1.0, float(np.abs(expected).max()))
    worst = float(np.abs(data - expected).max())
    if worst > tol:
        return f"dcm2niix's voxel values differ from the DICOM pixel data (by up to {worst:g})"
    return None


def convert_series(dicom_dir, series, work_dir, binary):
    """Convert one series with dcm2niix and check the result against the DICOM.

    Returns
    -------
    img : nibabel.Nifti1Image
        In memory, loaded from dcm2niix's file in ``work_dir``.
    sidecar : dict
        dcm2niix's JSON sidecar (unfiltered).
    notes : list of str
        dcm2niix's warnings, and what was not checked.

    Raises
    ------
    _StudyFailed
    """
    src, out = Path(work_dir) / "in", Path(work_dir) / "out"
    src.mkdir()
    out.mkdir()
    for n, rel in enumerate(series.files):  # copies: dcm2niix sees this series only; inputs untouched
        shutil.copyfile(Path(dicom_dir) / rel, src / f"{n:05d}.dcm")
    run = subprocess.run([binary, "-z", "n", "-b", "y", "-ba", "y", "-f", "series", "-o", str(out), str(src)],
                         capture_output=True, text=True)
    log = (run.stdout + run.stderr).splitlines()
    notes = [line.strip() for line in log if line.lower().startswith(("warning", "error"))]
    niftis = sorted(out.glob("*.nii"))
    if run.returncode != 0 or not niftis:
        raise _StudyFailed(f"dcm2niix could not convert {series.label} (exit {run.returncode}: "
                           f"{'; '.join(notes or log[-2:])})")
    if len(niftis) > 1:
        raise _StudyFailed(f"dcm2niix split {series.label} into {len(niftis)} volumes: a mixed series "
                           f"({'; '.join(notes) or 'different echoes, orientations or sizes'})")
    img = nib.load(niftis[0])
    img = nib.Nifti1Image.from_bytes(img.to_bytes())  # detach from the temporary file
    if img.ndim > 3:
        if any(n > 1 for n in img.shape[3:]):
            raise _StudyFailed(f"dcm2niix made a {img.ndim}D image of {series.label} ({img.shape}): "
                               "several volumes in one series")
        img = nib.funcs.squeeze_image(img)
    sidecar_path = niftis[0].with_suffix(".json")
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
    try:
        volume = dicom_volume(dicom_dir, series)
    except Exception as exc:  # noqa: BLE001 - compressed pixel data pydicom cannot decode: check geometry only
        volume = None
        notes.append(f"voxel values not cross-checked (pixel data not decodable here: {type(exc).__name__})")
    first = series.frames[0]
    problem = check_against_dicom(img, grid_affine_ras(series), (first.columns, first.rows, len(series.frames)), volume)
    if problem:
        raise _StudyFailed(f"{series.label}: {problem}")
    return img, sidecar, notes


def filtered_sidecar(sidecar):
    """The JSON sidecar without anything but acquisition parameters (:data:`SIDECAR_KEYS`)."""
    out = {}
    for key in SIDECAR_KEYS:
        value = sidecar.get(key)
        if isinstance(value, (int, float, str)) or (isinstance(value, list)
                                                    and all(isinstance(v, (int, float, str)) for v in value)):
            out[key] = value
    return out


def deidentified_payloads(img, sidecar):
    """The bytes to write: gzipped NIfTI without free text or extensions, and the filtered sidecar JSON."""
    from khe_vol.qa.deidentify import deidentified_nifti_bytes

    nifti = gzip.compress(deidentified_nifti_bytes(img), compresslevel=6, mtime=0)
    text = json.dumps(filtered_sidecar(sidecar), indent=2, sort_keys=True) + "\n"
    return nifti, text.encode("utf-8")


def leaks(payloads, identifying):
    """Identifying values (and any date) found in files about to be written.

    Parameters
    ----------
    payloads : dict of str -> bytes
        File name -> bytes.
    identifying : iterable of str
        The study's names, ids, dates, institution and UIDs.

    Returns
    -------
    list of str
        One line per leak (empty: clean). NIfTI files are scanned in their header
        text fields and extensions, other files as text, with the leak audit's
        matching (:mod:`khe_vol.qa.leaks`).
    """
    from khe_vol.qa.audit import scan_payload
    from khe_vol.qa.leaks import Scanner, Token

    scanner = Scanner([Token(t, "DICOM identifier") for t in sorted(identifying)])
    found = []
    for name, payload in payloads.items():
        found += [str(leak) for leak in scan_payload(scanner, name, name, payload)]
        if name.endswith(".nii.gz"):  # and anywhere in the raw header bytes
            header = gzip.decompress(payload)[:352]
            found += [f"{name}: header bytes contain {t}" for t in identifying if t.encode() in header]
    return found


# ---------------------------------------------------------------- the import


def _place(imaging_dir, pid, sid, nifti_bytes, json_bytes, force):
    """Write one session's T2 (+ sidecar); ``converted`` or ``unchanged``. Raises _StudyFailed."""
    anat = Path(imaging_dir) / pid / sid / "anat"
    stem = f"{pid}_{sid}_T2w"
    targets = {anat / f"{stem}.nii.gz": nifti_bytes, anat / f"{stem}.json": json_bytes}
    others = sorted(p.name for p in anat.glob("*_T2w.nii*") if p.name != f"{stem}.nii.gz") if anat.is_dir() else []
    if others:
        raise _StudyFailed(f"{anat} already holds another T2w series ({', '.join(others)}); the session would "
                           "hold two. Move it away first")
    if all(p.is_file() and p.read_bytes() == b for p, b in targets.items()):
        return "unchanged", f"{pid}/{sid}/anat/{stem}.nii.gz"
    differing = [p for p, b in targets.items() if p.is_file() and p.read_bytes() != b]
    if differing and not force:
        raise _StudyFailed(f"{differing[0]} exists with other content; rerun with --force to replace it")
    for path, payload in targets.items():
        atomic_write_bytes(path, payload)
    return "converted", f"{pid}/{sid}/anat/{stem}.nii.gz"


def _match(studies, visits_path, sessions, month_window):
    if month_window is not None:
        _, rows = read_visits(visits_path, month_window=True)
        return match_by_month_window(studies, rows, sessions, month_window)
    key, rows = read_visits(visits_path)
    return match_by_table(studies, key, rows)


def import_dicom(dicom_dir, imaging_dir, visits_path, *, rule_overrides=None, sessions=None, month_window=None,
                 uid_map_path=None, force=False, binary=None):
    """Import every study of a DICOM folder into the imaging folder.

    Parameters
    ----------
    dicom_dir : path-like
        A site's DICOM export (read only; searched recursively).
    imaging_dir : path-like
        The study's imaging folder (created if missing); must not overlap ``dicom_dir``.
    visits_path : path-like
        The visits table (:mod:`khe_vol.dicom.visits`).
    rule_overrides : dict, optional
        Config ``dicom_series_rule``.
    sessions : dict of str -> int, optional
        Config ``sessions``: required with ``month_window``; when given, a
        session label not in it is a study problem.
    month_window : float, optional
        Match studies by months after the first one instead of by the table's key.
    uid_map_path : path-like, optional
        Default :func:`default_uid_map_path`; never inside ``imaging_dir``.
    force : bool
        Replace an existing T2 of the session that differs.
    binary : str, optional
        dcm2niix binary (default :func:`dcm2niix_binary`).

    Returns
    -------
    outcomes : list of StudyOutcome
        Sorted by participant, session, study UID.
    scan_problems : list of str
        DICOM files that could not be used.
    paths : dict
        ``uid_map`` and ``report`` written.

    Raises
    ------
    DicomImportError
        Before anything is written: overlapping folders, a UID map inside
        the imaging folder, an unusable visits table or series rule.
    """
    from khe_vol.dicom.select import RuleError
    from khe_vol.dicom.visits import VisitsError

    dicom_dir, imaging_dir = Path(dicom_dir).resolve(), Path(imaging_dir).resolve()
    if not dicom_dir.is_dir():
        raise DicomImportError(f"{dicom_dir}: DICOM folder does not exist")
    if _inside(imaging_dir, dicom_dir) or _inside(dicom_dir, imaging_dir):
        raise DicomImportError(f"{dicom_dir} and {imaging_dir}: the DICOM folder and the imaging folder must not "
                               "contain one another")
    uid_map_path = Path(uid_map_path) if uid_map_path else default_uid_map_path(imaging_dir)
    if _inside(uid_map_path, imaging_dir):
        raise DicomImportError(f"{uid_map_path}: the UID map links participants to DICOM UIDs and must stay "
                               f"outside the imaging folder {imaging_dir}")
    if month_window is not None and not sessions:
        raise DicomImportError("--month-window needs the sessions of a config (--config)")
    try:
        rule = series_rule(rule_overrides)
    except RuleError as exc:
        raise DicomImportError(str(exc)) from None
    binary = binary or dcm2niix_binary()

    all_series, scan_problems = scan_folder(dicom_dir)
    by_study = {}
    for s in all_series:
        by_study.setdefault(s.study_instance_uid, []).append(s)
    studies = [Study(uid, ss[0].patient_id, ss[0].study_date, ss[0].accession_number) for uid, ss in by_study.items()]
    try:
        matches = _match(studies, visits_path, sessions, month_window)
    except (VisitsError, OSError) as exc:
        raise DicomImportError(str(exc)) from None

    outcomes, uid_rows = [], []
    for study_uid, series_list in by_study.items():
        m = matches[study_uid]
        outcome = StudyOutcome(study_uid, m.participant_id, m.session_id, "failed", series=series_list,
                               verdicts=[judge_series(s, rule) for s in series_list])
        outcomes.append(outcome)
        try:
            if m.problem:
                raise _StudyFailed(m.problem)
            if sessions is not None and m.session_id.removeprefix("ses-") not in sessions:
                raise _StudyFailed(f"session {m.session_id} is not in the config's sessions "
                                   f"({', '.join(sessions)})")
            chosen, outcome.verdicts, problem = choose_t2(series_list, rule, m.series_number)
            outcome.chosen = chosen
            if problem:
                raise _StudyFailed(problem)
            geometry = geometry_problems(chosen)
            if geometry:
                raise _StudyFailed(f"{chosen.label}: {'; '.join(geometry)}")
            with tempfile.TemporaryDirectory(prefix=".khe-vol-import-") as work:
                img, sidecar, notes = convert_series(dicom_dir, chosen, work, binary)
            nifti, side = deidentified_payloads(img, sidecar)
            identifying = set().union(*(s.identifying for s in series_list))
            found = leaks({"T2w.nii.gz": nifti, "T2w.json": side}, identifying)
            if found:
                raise _StudyFailed("the converted files would carry identifying text: " + "; ".join(found))
            _check_loadable(nifti)
            outcome.status, outcome.nifti = _place(imaging_dir, m.participant_id, m.session_id, nifti, side, force)
            kind = "enhanced multi-frame" if chosen.multiframe else f"{len(chosen.files)} single-frame files"
            outcome.message = "; ".join([f"{chosen.label} ({kind}) converted by dcm2niix"] + notes)
            uid_rows.append({
                "participant_id": m.participant_id, "session_id": m.session_id, "nifti": outcome.nifti,
                "dicom_dir": str(dicom_dir), "dicom_files": json.dumps(chosen.files),
                "study_instance_uid": study_uid, "series_instance_uid": chosen.series_instance_uid,
                "frame_of_reference_uid": chosen.frame_of_reference_uid,
                "series_description": chosen.series_description or chosen.protocol_name,
                # khe-vol check compares it with the session's month (sessions out of order).
                "study_date": chosen.study_date,
            })
        except _StudyFailed as exc:
            outcome.status, outcome.message = "failed", str(exc)
    outcomes.sort(key=lambda o: (o.participant_id or "~", o.session_id or "~", o.study_instance_uid))
    write_uid_map(uid_map_path, uid_rows)
    report_path = uid_map_path.with_name("import_report.tsv")
    write_tsv(report_path, REPORT_COLUMNS, report_rows(outcomes), keep_spaces=True)
    atomic_write_text(report_path.with_suffix(".json"), json.dumps(REPORT_COLUMNS, indent=2) + "\n")
    return outcomes, scan_problems, {"uid_map": uid_map_path, "report": report_path}


def _check_loadable(nifti_payload):
    """The written T2 must pass the workflow's own series checks."""
    from khe_vol.nifti import SeriesError, load_series

    with tempfile.TemporaryDirectory(prefix=".khe-vol-import-") as tmp:
        path = Path(tmp) / "T2w.nii.gz"
        path.write_bytes(nifti_payload)
        try:
            load_series(path)
        except SeriesError as exc:
            raise _StudyFailed(f"the converted series fails the workflow's checks: {exc}") from None


def write_uid_map(path, new_rows):
    """Merge rows into the UID map (one per participant x session; new rows replace old), atomically, sorted."""
    path = Path(path)
    rows = {}
    if path.is_file():
        for row in read_tsv(path):
            rows[(row["participant_id"], row["session_id"])] = row
    for row in new_rows:
        rows[(row["participant_id"], row["session_id"])] = row
    write_tsv(path, UID_MAP_COLUMNS, [rows[k] for k in sorted(rows)], keep_spaces=True)


def report_rows(outcomes):
    """import_report.tsv rows: every series of every study (:data:`REPORT_COLUMNS`)."""
    rows = []
    for o in outcomes:
        for s, v in zip(o.series, o.verdicts):
            rows.append({
                "participant_id": o.participant_id, "session_id": o.session_id,
                "study_instance_uid": o.study_instance_uid, "series_number": s.series_number,
                "series_description": s.series_description or s.protocol_name,
                "series_instance_uid": s.series_instance_uid, "n_files": len(s.files),
                "candidate": int(v.candidate), "reason": v.reason, "chosen": int(s is o.chosen),
                "study_status": o.status, "message": o.message,
            })
    return rows
