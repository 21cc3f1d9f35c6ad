"""DICOM series in a folder: headers, slice order and the geometry problems that make a volume wrong.

Headers only (pydicom, ``stop_before_pixels``); voxel values are read later,
for the one chosen series, by :mod:`khe_vol.dicom.importer`. Positions and
orientations are DICOM's patient LPS millimetres; :func:`grid_affine_ras`
turns a checked stack into a nibabel (RAS+) affine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

#: Largest difference of direction cosines still "the same orientation".
ORIENTATION_TOL = 1e-4
#: Slice spacing may vary by this much (mm, or this share of the median spacing, whichever is larger)
#: before the stack counts as unevenly spaced: DICOM positions are rounded decimals.
SPACING_TOL_MM, SPACING_TOL_FRACTION = 0.02, 0.01
#: A gap this many median spacings wide is missing slices, not uneven spacing.
GAP_FACTOR = 1.5
#: Largest in-plane shift (mm) between neighbouring slices before the stack is sheared (gantry tilt).
SHEAR_TOL_MM = 0.02


@dataclass(frozen=True)
class Frame:
    """One slice (a single-frame file, or one frame of a multi-frame file), LPS mm."""

    file: str
    index: int
    position_lps_mm: tuple
    orientation: tuple
    rows: int
    columns: int
    pixel_spacing_mm: tuple


@dataclass
class DicomSeries:
    """One series of one study, as found in a folder.

    ``files`` are paths relative to the DICOM folder; :func:`slice_order`
    sorts ``frames`` along the slice normal.
    """

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str = ""
    series_number: int | None = None
    series_description: str = ""
    protocol_name: str = ""
    modality: str = ""
    image_type: tuple = ()
    acquisition_type: str = ""
    echo_time_ms: float | None = None
    repetition_time_ms: float | None = None
    inversion_time_ms: float | None = None
    multiframe: bool = False
    #: identifying attributes of the study, for matching visits and for the leak check only
    patient_id: str = ""
    study_date: str = ""
    accession_number: str = ""
    identifying: set = field(default_factory=set)
    frames: list = field(default_factory=list)
    files: list = field(default_factory=list)

    @property
    def label(self):
        """How a coordinator finds the series on a workstation: number and description."""
        return f"series {self.series_number if self.series_number is not None else '?'} " \
               f"'{self.series_description or self.protocol_name or '(no description)'}'"


def _value(ds, keyword):
    """An attribute from the top level, else from an enhanced file's shared or first per-frame groups."""
    if keyword in ds and ds[keyword].value not in (None, ""):
        return ds[keyword].value
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if groups not in ds or not ds[groups].value:
            continue
        for macro in ds[groups].value[0]:
            if macro.VR == "SQ" and macro.value:
                item = macro.value[0]
                if keyword in item and item[keyword].value not in (None, ""):
                    return item[keyword].value
    return None


def _float(value):
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _group_item(group, sequence):
    if sequence in group and group[sequence].value:
        return group[sequence].value[0]
    return None


def _frames(ds, rel):
    """The slices of one file: one for single-frame, every frame of a multi-frame file."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
        out = []
        for n, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
            def find(sequence, keyword):
                for g in (group, shared):
                    item = _group_item(g, sequence) if g is not None else None
                    if item is not None and keyword in item:
                        return item[keyword].value
                return None
            position = find("PlanePositionSequence", "ImagePositionPatient")
            orientation = find("PlaneOrientationSequence", "ImageOrientationPatient")
            spacing = find("PixelMeasuresSequence", "PixelSpacing")
            if position is None or orientation is None or spacing is None:
                raise ValueError(f"frame {n + 1} has no position, orientation or pixel spacing")
            out.append(Frame(rel, n, tuple(map(float, position)), tuple(map(float, orientation)), rows, cols,
                             tuple(map(float, spacing))))
        return out
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
        raise ValueError("no ImagePositionPatient, ImageOrientationPatient or PixelSpacing")
    return [Frame(rel, 0, tuple(map(float, ds.ImagePositionPatient)), tuple(map(float, ds.ImageOrientationPatient)),
                  rows, cols, tuple(map(float, ds.PixelSpacing)))]


#: Attributes whose values identify the patient, the visit or the site: they must never reach imaging_dir.
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "IssuerOfPatientID",
    "RequestingPhysician", "PhysiciansOfRecord", "StudyDate", "SeriesDate",
    "AcquisitionDate", "ContentDate", "AccessionNumber", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "StationName", "DeviceSerialNumber", "StudyID", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "FrameOfReferenceUID",
)


def _identifying(ds):
    out = set()
    for keyword in IDENTIFYING_KEYWORDS:
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        values = value if isinstance(value, pydicom.multival.MultiValue) else [value]
        for v in values:
            text = str(v).strip()
            out.add(text)
            if keyword.endswith("Name"):  # person names by component, too
                out.update(p.strip() for p in text.replace("^", " ").replace(",", " ").split() if len(p.strip()) > 2)
            if keyword.endswith("Date") and len(text) == 8 and text.isdigit():
                out.add(f"{text[:4]}-{text[4:6]}-{text[6:]}")
    return {t for t in out if len(t) >= 3}


def scan_folder(dicom_dir):
    """Every image series under a folder, by study.

    Parameters
    ----------
    dicom_dir : path-like
        Searched recursively; files that are not DICOM are skipped.

    Returns
    -------
    series : list of DicomSeries
        Sorted by study, then series number; ``frames`` in slice order.
    problems : list of str
        Files that are DICOM but unusable (no geometry, unreadable), named.
    """
    root = Path(dicom_dir)
    by_uid: dict[tuple[str, str], DicomSeries] = {}
    problems = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, EOFError, ValueError):
                continue  # not DICOM (or not a file DICOM can be read from); nothing to import
            if "Rows" not in ds or "StudyInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
                continue  # not an image (a report, a presentation state, a DICOMDIR)
            try:
                frames = _frames(ds, rel)
            except (ValueError, TypeError, AttributeError, IndexError) as exc:
                problems.append(f"{path}: DICOM image without usable geometry ({exc}); skipped")
                continue
            key = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
            series = by_uid.get(key)
            if series is None:
                number = ds.get("SeriesNumber")
                series = by_uid[key] = DicomSeries(
                    study_instance_uid=key[0], series_instance_uid=key[1],
                    frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
                    series_number=int(number) if number not in (None, "") else None,
                    series_description=str(ds.get("SeriesDescription", "")).strip(),
                    protocol_name=str(ds.get("ProtocolName", "")).strip(),
                    modality=str(ds.get("Modality", "")),
                    image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
                    acquisition_type=str(_value(ds, "MRAcquisitionType") or ""),
                    echo_time_ms=_float(_value(ds, "EchoTime") or _value(ds, "EffectiveEchoTime")),
                    repetition_time_ms=_float(_value(ds, "RepetitionTime")),
                    inversion_time_ms=_float(_value(ds, "InversionTime")),
                    multiframe="PerFrameFunctionalGroupsSequence" in ds,
                    patient_id=str(ds.get("PatientID", "")).strip(),
                    study_date=str(ds.get("StudyDate", "")).strip(),
                    accession_number=str(ds.get("AccessionNumber", "")).strip(),
                )
            series.identifying |= _identifying(ds)
            series.multiframe |= "PerFrameFunctionalGroupsSequence" in ds
            series.frames.extend(frames)
            series.files.append(rel)
    out = sorted(by_uid.values(), key=lambda s: (s.study_instance_uid, s.series_number or 0, s.series_instance_uid))
    for series in out:
        series.frames = slice_order(series.frames)
        files = []
        for f in series.frames:
            if f.file not in files:
                files.append(f.file)
        series.files = files
    return out, problems


def _normal(orientation):
    o = np.asarray(orientation, float)
    n = np.cross(o[:3], o[3:])
    return n / np.linalg.norm(n)


def slice_order(frames):
    """Frames sorted by position along the slice normal (of the first frame), then file and frame."""
    if not frames:
        return []
    normal = _normal(frames[0].orientation)
    return sorted(frames, key=lambda f: (float(np.dot(f.position_lps_mm, normal)), f.file, f.index))


def geometry_problems(series):
    """What makes a series' slices not one evenly spaced, unsheared stack.

    Parameters
    ----------
    series : DicomSeries
        With ``frames`` in slice order.

    Returns
    -------
    list of str
        Empty for a good stack. Otherwise each problem, coordinator-readable:
        a mixed series (orientations or sizes differ, two slices at one
        position), missing slices (a gap), varying slice spacing, slices
        shifted in plane (gantry tilt / sheared stack), too few slices.
    """
    frames = series.frames
    if len(frames) < 3:
        return [f"only {len(frames)} slice(s): not a volume"]
    o = np.array([f.orientation for f in frames])
    sizes = {(f.rows, f.columns) for f in frames}
    spacings = np.array([f.pixel_spacing_mm for f in frames])
    problems = []
    if np.abs(o - o[0]).max() > ORIENTATION_TOL:
        n_orient = len({tuple(np.round(v, 3)) for v in o})
        problems.append(f"mixed series: slices in {n_orient} orientations (ImageOrientationPatient differs)")
    if len(sizes) > 1:
        problems.append(f"mixed series: slices of {len(sizes)} sizes ({', '.join(f'{r}x{c}' for r, c in sorted(sizes))})")
    if np.abs(spacings - spacings[0]).max() > 1e-4:
        problems.append("mixed series: pixel spacing differs between slices")
    if problems:
        return problems
    normal = _normal(frames[0].orientation)
    positions = np.array([f.position_lps_mm for f in frames])
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    if (along < SPACING_TOL_MM).any():
        n = int((along < SPACING_TOL_MM).sum())
        return [f"mixed series: {n} pair(s) of slices at the same position (repeated acquisition, several "
                "echoes or contrasts in one series)"]
    shear = np.linalg.norm(steps - along[:, None] * normal, axis=1)
    if shear.max() > SHEAR_TOL_MM:
        problems.append(f"slices shifted in plane by up to {shear.max():.2f} mm per slice (gantry tilt or a "
                        "sheared stack): the volume would be distorted")
    median = float(np.median(along))
    tol = max(SPACING_TOL_MM, SPACING_TOL_FRACTION * median)
    gaps = np.flatnonzero(along > GAP_FACTOR * median)
    if gaps.size:
        missing = int(sum(round(along[g] / median) - 1 for g in gaps))
        where = ", ".join(f"after slice {g + 1} ({along[g]:.2f} mm)" for g in gaps[:3])
        problems.append(f"missing slices: about {missing} slice(s) missing at {median:.2f} mm spacing, gap {where}")
    elif np.abs(along - median).max() > tol:
        problems.append(f"varying slice spacing: {along.min():.3f} to {along.max():.3f} mm between neighbouring "
                        "slices")
    return problems


def grid_affine_ras(series):
    """The voxel -> RAS+ mm affine of a checked stack (:func:`geometry_problems` empty).

    Voxel ``(c, r, s)`` is column c, row r of the s-th slice in slice order.
    """
    first, last = series.frames[0], series.frames[-1]
    o = np.asarray(first.orientation, float)
    row_spacing, col_spacing = first.pixel_spacing_mm
    n = len(series.frames)
    lps = np.eye(4)
    lps[:3, 0] = o[:3] * col_spacing  # along a row: increasing column index
    lps[:3, 1] = o[3:] * row_spacing  # down a column: increasing row index
    lps[:3, 2] = (np.asarray(last.position_lps_mm) - np.asarray(first.position_lps_mm)) / (n - 1)
    lps[:3, 3] = first.position_lps_mm
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
