"""DICOM out: each series' final lesion mask as a DICOM SEG, its measurements as a TID 1500 SR.

What a PACS viewer (OHIF, 3D Slicer, a vendor workstation) needs to show the
result over the site's own images:

* **SEG** (:func:`segmentation_dataset`): BINARY, one segment "lesion"
  (segmented property category SCT 49755003 "Morphologically abnormal
  structure", type SCT 4147007 "Mass": the closest code in DICOM's lesion
  context groups CID 7151/7159; SNOMED's KHE concept is in no DICOM context
  group, so it is named in the segment description text only). Frames are the
  source series' own frames, placed by the SOURCE DICOM geometry
  (ImagePositionPatient / ImageOrientationPatient, LPS); the mask is carried
  from the NIfTI grid (RAS+) by physical position, and a source whose pixel
  centres do not coincide with the NIfTI voxel centres one to one is refused
  (:func:`mask_on_source_frames`), never resampled.
* **Algorithm type** (:func:`algorithm_type`) from how the final mask was
  made: automatic (seeded from the seeds table, or tracked) -> AUTOMATIC; a
  blinded reader's edit or a reader's clicks -> SEMIAUTOMATIC; a reader-drawn
  mask from ``masks_dir``, or a reader's "no residual lesion" verdict ->
  MANUAL. Algorithm family (AUTOMATIC / SEMIAUTOMATIC only) DCM 123101
  "Neighborhood Analysis" (CID 7162: the segmentation grows a region from
  the seed by intensity levels of its neighbourhood; it is not AI).
* **Clinical trial attributes**: ClinicalTrialSubjectID = the participant
  label (without ``sub-``), ClinicalTrialTimePointID = the session label
  (e.g. ``m06``), ClinicalTrialTimePointDescription = "month 6" ("baseline
  (month 0)"); sponsor, protocol and site from the config's ``dicom_trial``, else
  the source's. Without a sponsor and a protocol id (Type 1) the Clinical Trial
  Subject module (sponsor, protocol, site, subject id) is left out; the time
  point (Clinical Trial Study module) is always written.
* **SR** (:func:`sr_dataset`): Comprehensive 3D SR, TID 1500 measurement
  report with one volumetric group referencing the SEG's segment: volume (mL,
  UCUM ``ml``, SCT 118565006, method DCM 126030 "Sum of segmented voxel
  method for volume"), maximal 3D diameter (mm, SCT 81827009 with derivation
  SCT 56851009 "Maximum"), and for a follow-up the response category vs
  baseline as a qualitative evaluation coded in the private scheme
  ``99KHEVOL`` (no standard code exists for the KHE categories; codes are
  the ``response.tsv`` category names) plus whether it needs review (SCT
  Yes/No, reasons in ``99KHEVOL``, declared in CodingSchemeIdentificationSequence).
  The observer is khe-vol as a device (TID 1002/1004, :data:`DEVICE_OBSERVER_UID`).
* **Reproducible bytes**: every UID the export creates is
  ``2.25.<decimal of 128 bits of SHA-256>`` (the ISO/IEC 9834-8 UUID root) of
  the source SeriesInstanceUID, the mask's SHA-256 and what the UID is for
  (:func:`derived_uid`); ContentDate/ContentTime and SeriesDate/Time are the
  source series' (SeriesDate, else StudyDate). A rerun on the same inputs
  writes the same bytes.

The SEG and SR carry the source's patient and study attributes (so a PACS
files them with the images): ``<results_dir>/dicom`` holds identifiers and
goes back to the site, never to blinded readers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np

from khe_vol import __version__
from khe_vol.geometry import RAS_TO_LPS, world_to_voxel

#: Private coding scheme of khe-vol's own concepts (DICOM PS3.16 "99" local schemes).
CODING_SCHEME = "99KHEVOL"

#: A NIfTI voxel centre and a DICOM pixel centre "coincide" within this share of a voxel
#: (float32 NIfTI headers and 16-character DS strings each round at ~1e-6 mm; a
#: real mismatch is a whole voxel or a half-voxel shift).
COINCIDE_TOLERANCE_VOXEL = 0.05

AUTOMATIC, SEMIAUTOMATIC, MANUAL = "AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"

#: Response categories of response.tsv as 99KHEVOL codes (value, meaning).
CATEGORY_MEANINGS = {
    "growth": "Growth (volume increase >= 20 %)",
    "no_change": "No change (< 20 % increase and < 20 % decrease)",
    "partial_involution": "Partial involution (decrease >= 20 % and < 75 %)",
    "nearly_complete_involution": "Nearly complete involution (decrease >= 75 % and < 100 %)",
    "complete_involution": "Complete involution (no lesion left)",
}


class ExportError(ValueError):
    """A series cannot be exported; the message names the file and the problem."""


def derived_uid(*parts):
    """A UID that is a pure function of ``parts``: ``2.25.<128-bit hash>``.

    Parameters
    ----------
    *parts : str
        What identifies the object (source series UID, mask SHA-256, role).

    Returns
    -------
    str
        At most 44 characters (2.25. + up to 39 digits), valid as a DICOM UID.
    """
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


#: Device Observer UID of khe-vol in every SR (TID 1004): the same on every run and machine.
DEVICE_OBSERVER_UID = derived_uid("khe-vol", "device observer")


def algorithm_type(record):
    """DICOM SEG algorithm type of a (final) record's mask.

    Parameters
    ----------
    record : dict
        Per-series record; after blinded reading a final record whose
        ``volume_source`` is ``<reader>:<verdict>``.

    Returns
    -------
    str
        ``AUTOMATIC`` (method ``auto``: seeded from the seeds table or
        tracked), ``SEMIAUTOMATIC`` (a reader's edit, or a baseline a reader
        seeded by clicks) or ``MANUAL`` (a reader mask from ``masks_dir``, or
        a reader's "no residual lesion" verdict).
    """
    source = str(record.get("volume_source") or "")
    if ":" in source:
        verdict = source.split(":", 1)[1]
        if verdict == "edited":
            return SEMIAUTOMATIC
        if verdict == "no_residual_lesion":
            return MANUAL
        if verdict != "accept":
            raise ExportError(f"{record['participant_id']} {record['session_id']}: no final mask (verdict {verdict})")
    method = record.get("method")
    if method == "auto":
        return SEMIAUTOMATIC if record.get("seed_source") == "reader" else AUTOMATIC
    if method == "reader_seeded":
        return SEMIAUTOMATIC
    if method == "reader_mask":
        return MANUAL
    raise ExportError(f"{record['participant_id']} {record['session_id']}: unknown mask method {method!r}")


# ---------------------------------------------------------------- source geometry


@dataclass(frozen=True)
class SourceFrames:
    """The frames of a source DICOM series in LPS mm, as stored (not re-sorted).

    ``positions_lps_mm[n]`` is frame n's ImagePositionPatient (centre of its
    first pixel); a pixel ``(r, c)`` of every frame lies at
    ``position + c * col_spacing * row_cosine + r * row_spacing * col_cosine``.
    """

    positions_lps_mm: np.ndarray  # (n_frames, 3)
    row_cosine: np.ndarray  # (3,) direction of increasing column index (IOP[:3])
    col_cosine: np.ndarray  # (3,) direction of increasing row index (IOP[3:])
    row_spacing_mm: float  # PixelSpacing[0]: between rows
    col_spacing_mm: float  # PixelSpacing[1]: between columns
    rows: int
    columns: int

    def pixel_centres_ras_mm(self):
        """RAS+ mm of every pixel centre, shape (n_frames, rows, columns, 3)."""
        r = np.arange(self.rows, dtype=float)[:, None, None]
        c = np.arange(self.columns, dtype=float)[None, :, None]
        in_plane = c * self.col_spacing_mm * self.row_cosine + r * self.row_spacing_mm * self.col_cosine
        lps = self.positions_lps_mm[:, None, None, :] + in_plane[None]
        return lps @ RAS_TO_LPS.T  # the flip is its own inverse


def _floats(value, n, what, where):
    try:
        out = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        out = np.array([])
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise ExportError(f"{where}: {what} is missing or malformed ({value!r})")
    return out


def _frame_functional_group(ds, frame_index, sequence):
    """An enhanced multi-frame functional group item: the frame's own, else the shared one."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for item in (per_frame[frame_index] if per_frame else None, shared[0] if shared else None):
        if item is not None and sequence in item:
            return item[sequence][0]
    return None


def source_frames(datasets, where="source series"):
    """Geometry of a source series' frames (single-frame files or one enhanced multi-frame file).

    Parameters
    ----------
    datasets : sequence of pydicom.Dataset
        The series' instances in the uid map's order.
    where : str
        Named in errors (the DICOM folder).

    Returns
    -------
    SourceFrames

    Raises
    ------
    ExportError
        Mixed series, frames of different orientation, size or spacing, or missing geometry.
    """
    if not datasets:
        raise ExportError(f"{where}: no DICOM files listed")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1:
        raise ExportError(f"{where}: files of {len(series_uids)} series listed as one: {sorted(series_uids)}")
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
        ds = datasets[0]
        n = int(ds.NumberOfFrames)
        positions, orientations, spacings = [], [], []
        for f in range(n):
            pos = _frame_functional_group(ds, f, "PlanePositionSequence")
            ori = _frame_functional_group(ds, f, "PlaneOrientationSequence")
            meas = _frame_functional_group(ds, f, "PixelMeasuresSequence")
            if pos is None or ori is None or meas is None:
                raise ExportError(f"{where}: enhanced frame {f + 1} lacks its plane position, orientation or pixel measures")
            positions.append(_floats(pos.get("ImagePositionPatient"), 3, "ImagePositionPatient", where))
            orientations.append(_floats(ori.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", where))
            spacings.append(_floats(meas.get("PixelSpacing"), 2, "PixelSpacing", where))
    else:
        positions = [_floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", where) for ds in datasets]
        orientations = [_floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", where) for ds in datasets]
        spacings = [_floats(ds.get("PixelSpacing"), 2, "PixelSpacing", where) for ds in datasets]
        sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
        if len(sizes) != 1:
            raise ExportError(f"{where}: frames of different sizes {sorted(sizes)}")
    if np.ptp(np.array(orientations), axis=0).max() > 1e-4:
        raise ExportError(f"{where}: frames of different orientation (ImageOrientationPatient); not one volume")
    if np.ptp(np.array(spacings), axis=0).max() > 1e-4:
        raise ExportError(f"{where}: frames of different PixelSpacing; not one volume")
    iop, spacing = orientations[0], spacings[0]
    return SourceFrames(
        positions_lps_mm=np.array(positions),
        row_cosine=iop[:3] / np.linalg.norm(iop[:3]),
        col_cosine=iop[3:] / np.linalg.norm(iop[3:]),
        row_spacing_mm=float(spacing[0]),
        col_spacing_mm=float(spacing[1]),
        rows=int(datasets[0].Rows),
        columns=int(datasets[0].Columns),
    )


def mask_on_source_frames(mask, mask_affine, frames, where="source series",
                          tolerance_voxel=COINCIDE_TOLERANCE_VOXEL):
    """The mask as the source series' frames, voxel for voxel by physical position.

    Parameters
    ----------
    mask : (I, J, K) array_like
        Final lesion mask on the NIfTI grid (non-zero = lesion).
    mask_affine : (4, 4) array_like
        Its voxel -> RAS+ mm affine.
    frames : SourceFrames
        The source DICOM frames.
    where : str
        Named in errors.
    tolerance_voxel : float
        How far (in voxels, along each NIfTI axis) a pixel centre may lie from
        a voxel centre and still be that voxel.

    Returns
    -------
    ndarray of uint8, shape (n_frames, rows, columns)
        Frame n is the mask on source frame n.

    Raises
    ------
    ExportError
        When the source pixels and the NIfTI voxels are not the same set of
        points (another grid, a shift, missing or extra slices): the SEG
        would put the lesion in the wrong place, so nothing is written.
    """
    mask = np.asarray(mask)
    ijk = world_to_voxel(frames.pixel_centres_ras_mm(), mask_affine)
    nearest = np.rint(ijk)
    off = np.abs(ijk - nearest).max()
    if off > tolerance_voxel:
        raise ExportError(
            f"{where}: the DICOM pixel centres lie up to {off:.2f} voxel from the NIfTI voxel centres: "
            "the DICOM series is not on the mask's grid (another series, or re-imported differently)"
        )
    idx = nearest.astype(np.int64).reshape(-1, 3)
    shape = np.asarray(mask.shape[:3])
    inside = np.all((idx >= 0) & (idx < shape), axis=1)
    n_unique = len(np.unique(np.ravel_multi_index(idx[inside].T, mask.shape[:3]))) if inside.any() else 0
    if not inside.all() or n_unique != idx.shape[0] or idx.shape[0] != mask.size:
        raise ExportError(
            f"{where}: the DICOM series ({len(frames.positions_lps_mm)} frames of {frames.rows} x {frames.columns}) "
            f"does not cover the NIfTI grid {tuple(int(s) for s in mask.shape)} one to one "
            f"({int((~inside).sum())} pixel(s) outside it, {n_unique} distinct voxels hit): missing or extra slices"
        )
    out = (mask[idx[:, 0], idx[:, 1], idx[:, 2]] != 0).astype(np.uint8)
    return out.reshape(len(frames.positions_lps_mm), frames.rows, frames.columns)


# ---------------------------------------------------------------- SEG


#: Config ``dicom_trial`` keys -> the Clinical Trial Subject module's attributes.
TRIAL_SUBJECT_KEYWORDS = {
    "sponsor_name": "ClinicalTrialSponsorName", "protocol_id": "ClinicalTrialProtocolID",
    "protocol_name": "ClinicalTrialProtocolName", "site_id": "ClinicalTrialSiteID", "site_name": "ClinicalTrialSiteName",
}


def _source_date_time(ds):
    date = ds.get("SeriesDate") or ds.get("StudyDate") or ""
    time = ds.get("SeriesTime") or ds.get("StudyTime") or ""
    return str(date), str(time)


def time_point_description(session_id, month):
    """``baseline (month 0)`` / ``month 6``: ClinicalTrialTimePointDescription."""
    if month is None:
        return str(session_id).removeprefix("ses-")
    return f"baseline (month {month})" if month == 0 else f"month {month}"


def _set_trial_and_dates(ds, source, participant_id, session_id, month, trial):
    date, time = _source_date_time(source)
    # The source's dates, never the clock: a rerun writes the same bytes.
    for kw in ("SeriesDate", "ContentDate", "InstanceCreationDate"):
        setattr(ds, kw, date)
    for kw in ("SeriesTime", "ContentTime", "InstanceCreationTime"):
        setattr(ds, kw, time)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + time
    trial = dict(trial or {})
    subject = {keyword: str(trial.get(key) or source.get(keyword, "") or "")
               for key, keyword in TRIAL_SUBJECT_KEYWORDS.items()}
    # The Clinical Trial Subject module needs a sponsor and a protocol id (Type 1): without
    # both (neither in dicom_trial nor in the source) it is left out, never written empty.
    if subject["ClinicalTrialSponsorName"] and subject["ClinicalTrialProtocolID"]:
        for keyword, value in subject.items():
            setattr(ds, keyword, value)
        ds.ClinicalTrialSubjectID = str(participant_id).removeprefix("sub-")
    else:
        for keyword in (*subject, "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID"):
            if keyword in ds:
                del ds[keyword]
    # The Clinical Trial Study module (the time point) stands on its own.
    ds.ClinicalTrialTimePointID = str(session_id).removeprefix("ses-")
    ds.ClinicalTrialTimePointDescription = time_point_description(session_id, month)


def _fix_generated_uids(ds, seed):
    """Replace the UIDs highdicom draws at random (dimension organisation) by derived ones."""
    for item in ds.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = derived_uid(seed, "dimension-organization")
    for item in ds.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = derived_uid(seed, "dimension-organization")


def segmentation_dataset(source_datasets, mask, mask_affine, algorithm, participant_id, session_id, month,
                         trial=None, where="source series"):
    """A DICOM SEG of a final lesion mask, on the source series' frames.

    Parameters
    ----------
    source_datasets : sequence of pydicom.Dataset
        The source T2 series (single-frame instances in the uid map's order,
        or one enhanced multi-frame instance), with pixel data.
    mask : (I, J, K) array_like
        Final lesion mask on the imported NIfTI's grid (non-zero = lesion).
    mask_affine : (4, 4) array_like
        Its voxel -> RAS+ mm affine.
    algorithm : str
        ``AUTOMATIC``, ``SEMIAUTOMATIC`` or ``MANUAL`` (:func:`algorithm_type`).
    participant_id, session_id : str
        ``sub-<label>``, ``ses-<label>``.
    month : int or None
        Month of the session (time point description).
    trial : dict, optional
        ``sponsor_name``, ``protocol_id``, ``protocol_name``, ``site_id``,
        ``site_name`` (config ``dicom_trial``); else the source's, else empty.
    where : str
        Named in errors.

    Returns
    -------
    highdicom.seg.Segmentation

    Raises
    ------
    ExportError
        Source geometry that does not coincide with the mask's grid.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frames = source_frames(source_datasets, where)
    seg_frames = mask_on_source_frames(mask, mask_affine, frames, where)
    source = source_datasets[0]
    mask_sha = hashlib.sha256(np.ascontiguousarray(seg_frames).tobytes()).hexdigest()
    seed = f"{source.SeriesInstanceUID}|{mask_sha}|{algorithm}|{participant_id}|{session_id}"
    algorithm_id = None
    if algorithm != MANUAL:
        algorithm_id = hd.AlgorithmIdentificationSequence(
            name="khe-vol", version=__version__, family=codes.cid7162.NeighborhoodAnalysis,
        )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Mass,
        algorithm_type=algorithm,
        algorithm_identification=algorithm_id,
        tracking_uid=derived_uid(seed, "tracking"),
        tracking_id="KHE lesion",
    )
    seg = hd.seg.Segmentation(
        source_images=list(source_datasets),
        pixel_array=seg_frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=derived_uid(seed, "seg-series"),
        series_number=int(source.get("SeriesNumber") or 0) + 9000,
        sop_instance_uid=derived_uid(seed, "seg-instance"),
        instance_number=1,
        manufacturer="khe-vol",
        manufacturer_model_name="khe-vol",
        software_versions=__version__,
        device_serial_number="n/a",
        content_description="KHE lesion (kaposiform hemangioendothelioma), final mask",
        content_label="KHE_LESION",
        series_description="khe-vol lesion SEG",
        omit_empty_frames=bool(seg_frames.any()),  # an empty mask (0 mL) keeps its frames: a viewer shows "none"
    )
    _fix_generated_uids(seg, seed)
    _set_trial_and_dates(seg, source, participant_id, session_id, month, trial)
    return seg


# ---------------------------------------------------------------- SR


def _code(value, meaning):
    import highdicom as hd

    return hd.sr.CodedConcept(value=value, scheme_designator=CODING_SCHEME, meaning=meaning)


def sr_dataset(seg, source_datasets, volume_ml, max_diameter_mm, participant_id, session_id, month,
               category=None, review_reasons=(), trial=None):
    """A TID 1500 measurement report of one series, referencing its SEG.

    Parameters
    ----------
    seg : highdicom.seg.Segmentation
        The series' SEG (:func:`segmentation_dataset`).
    source_datasets : sequence of pydicom.Dataset
        The source series (evidence).
    volume_ml : str or float
        Final lesion volume, mL; give the ``volumes.tsv`` text to store exactly that value.
    max_diameter_mm : str, float or None
        Maximal 3D diameter, mm (None: no lesion, nothing to measure).
    participant_id, session_id : str
        ``sub-<label>``, ``ses-<label>``.
    month : int or None
    category : str or None
        ``response.tsv`` category vs baseline (None at the baseline, or when
        there is none).
    review_reasons : sequence of str
        Review reason codes (``khe_vol.review``); non-empty -> "needs review: yes".
    trial : dict, optional
        As for :func:`segmentation_dataset`.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    seed = f"{seg.SOPInstanceUID}|sr"
    measurements = [
        hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=float(Decimal(str(volume_ml))),
            unit=hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter"),
            method=codes.DCM.SumOfSegmentedVoxelMethodForVolume,
        )
    ]
    if max_diameter_mm is not None:
        measurements.append(hd.sr.Measurement(
            name=codes.SCT.Diameter,
            value=float(Decimal(str(max_diameter_mm))),
            unit=codes.UCUM.Millimeter,
            derivation=codes.SCT.Maximum,
        ))
    evaluations = []
    if category is not None:
        if category not in CATEGORY_MEANINGS:
            raise ExportError(f"{participant_id} {session_id}: unknown response category {category!r}")
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=_code("response_vs_baseline", "Volumetric response category vs baseline"),
            value=_code(category, CATEGORY_MEANINGS[category]),
        ))
    evaluations.append(hd.sr.QualitativeEvaluation(
        name=_code("needs_review", "Needs a reader's review"),
        value=codes.SCT.Yes if review_reasons else codes.SCT.No,
    ))
    for reason in review_reasons:
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=_code("review_reason", "Review reason"), value=_code(reason, reason.replace("_", " ")),
        ))
    time_point = hd.sr.TimePointContext(
        time_point=str(session_id).removeprefix("ses-"),
        subject_time_point_identifier=time_point_description(session_id, month),
        protocol_time_point_identifier=str(session_id).removeprefix("ses-"),
    )
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(seed, "tracking"), identifier="KHE lesion"),
        # The segment by SOP instance and number, with the source series (highdicom's
        # from_segmentation needs per-frame segment ids, which a one-segment SEG shares).
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=1,
            source_series=hd.sr.SourceSeriesForSegmentation(source_datasets[0].SeriesInstanceUID),
        ),
        time_point_context=time_point,
        finding_type=codes.SCT.Mass,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    report = hd.sr.MeasurementReport(
        # TID 1001 needs an observer when none is inherited: khe-vol, a device (TID 1004).
        observation_context=hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=DEVICE_OBSERVER_UID, name="khe-vol", manufacturer_name="khe-vol", model_name=__version__),
        )),
        procedure_reported=codes.cid100.MRIUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source_datasets, seg],
        content=report,
        series_instance_uid=derived_uid(seed, "sr-series"),
        series_number=int(seg.SeriesNumber) + 1,
        sop_instance_uid=derived_uid(seed, "sr-instance"),
        instance_number=1,
        manufacturer="khe-vol",
        series_description="khe-vol lesion volume report",
        is_complete=True,
    )
    _set_trial_and_dates(sr, source_datasets[0], participant_id, session_id, month, trial)
    scheme = pydicom.Dataset()  # the private scheme, declared (PS3.3 C.12.1.1.3.1)
    scheme.CodingSchemeDesignator = CODING_SCHEME
    scheme.CodingSchemeName = "khe-vol volumetric response categories and review reasons"
    scheme.CodingSchemeResponsibleOrganization = "khe-vol"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


# ---------------------------------------------------------------- the cohort (file I/O at the edge)

#: Columns of ``<results_dir>/dicom/export.tsv``: what was exported, and why not.
EXPORT_COLUMNS = ["participant_id", "session_id", "status", "algorithm_type", "seg", "sr",
                  "series_instance_uid", "message"]

#: Columns the uid map must have (the CONTRACT with ``khe-vol import``).
UID_MAP_COLUMNS = ["participant_id", "session_id", "nifti", "dicom_dir", "dicom_files", "study_instance_uid",
                   "series_instance_uid", "frame_of_reference_uid", "series_description"]


def read_uid_map(path):
    """The uid map's rows by (participant_id, session_id).

    Raises
    ------
    ValueError
        Naming the file: missing columns or a series listed twice.
    """
    from khe_vol.files import read_tsv

    rows = read_tsv(path)
    missing = [c for c in UID_MAP_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: uid map lacks column(s) {', '.join(missing)} (written by khe-vol import)")
    out = {}
    for row in rows:
        key = (row["participant_id"], row["session_id"])
        if key in out:
            raise ValueError(f"{path}: {key[0]} {key[1]} is listed twice")
        out[key] = row
    return out


def final_mask_path(record, derivatives_dir):
    """Path of a record's final mask in the derivatives dataset (None: the final mask is empty).

    A blinded reader's edit is ``desc-<reader>``; a "no residual lesion"
    verdict is an empty mask; otherwise the series' own mask.
    """
    from khe_vol.derivatives import mask_relpath

    source = str(record.get("volume_source") or "")
    reader, _, verdict = source.partition(":")
    if verdict == "no_residual_lesion":
        return None
    rel = mask_relpath(record["participant_id"], record["session_id"], reader if verdict == "edited" else None)
    return Path(derivatives_dir) / rel


def _read_source(row, where):
    import pydicom

    try:
        files = json.loads(row["dicom_files"])
    except ValueError as exc:
        raise ExportError(f"{where}: dicom_files is not a JSON list ({exc})") from exc
    datasets = []
    for rel in files:
        path = Path(row["dicom_dir"]) / rel
        try:
            datasets.append(pydicom.dcmread(path))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise ExportError(f"{path}: cannot read the source DICOM file ({exc})") from exc
    wrong = sorted({str(ds.get("SeriesInstanceUID")) for ds in datasets} - {row["series_instance_uid"]})
    if wrong:
        raise ExportError(
            f"{where}: the listed files belong to series {', '.join(wrong)}, not {row['series_instance_uid']} "
            "as the uid map says; re-run khe-vol import"
        )
    return datasets


def export_series(record, volume_row, response_row, row, imaging_dir, derivatives_dir, trial=None):
    """The SEG and SR of one series (datasets), or an ExportError saying why not.

    Parameters
    ----------
    record : dict
        The series' final record.
    volume_row, response_row : dict or None
        Its ``volumes.tsv`` and ``response.tsv`` rows (text as written).
    row : dict
        Its uid map row.
    imaging_dir, derivatives_dir : path-like
    trial : dict, optional

    Returns
    -------
    (highdicom.seg.Segmentation, highdicom.sr.Comprehensive3DSR, str)
        SEG, SR and the algorithm type.
    """
    from khe_vol.files import NA
    from khe_vol.nifti import SeriesError, load_image

    pid, ses = record["participant_id"], record["session_id"]
    where = f"{pid} {ses} ({row['dicom_dir']})"
    if record["status"] != "ok" or volume_row is None or volume_row["status"] != "ok":
        raise ExportError(f"{pid} {ses}: no final volume ({record.get('message') or 'see volumes.tsv'})")
    mapped = (Path(imaging_dir) / row["nifti"]).resolve()
    if mapped != Path(record["source_file"]).resolve():
        raise ExportError(
            f"{where}: the uid map's NIfTI {mapped} is not the series measured ({record['source_file']}); "
            "the map is from another import"
        )
    algorithm = algorithm_type(record)
    mask_path = final_mask_path(record, derivatives_dir)
    if mask_path is None:
        mask, affine = np.zeros(record["shape"], np.uint8), np.asarray(record["affine"], float)
    else:
        try:
            image = load_image(mask_path, "mask")
        except SeriesError as exc:
            raise ExportError(str(exc)) from exc
        mask, affine = image.data != 0, image.affine
    datasets = _read_source(row, where)
    seg = segmentation_dataset(datasets, mask, affine, algorithm, pid, ses, record["month"], trial, where)
    diameter_cm = volume_row["max_diameter_cm"]
    diameter_mm = None if diameter_cm == NA else Decimal(diameter_cm) * 10
    category = None
    if response_row is not None and response_row["status"] == "ok":
        category = response_row["category"]
    reasons = [] if volume_row["review_reason"] == NA else volume_row["review_reason"].split(";")
    if response_row is not None and response_row["review_reason"] != NA:
        reasons = sorted(set(reasons) | set(response_row["review_reason"].split(";")))
    sr = sr_dataset(seg, datasets, volume_row["volume_ml"], diameter_mm, pid, ses, record["month"],
                    category=category, review_reasons=reasons, trial=trial)
    return seg, sr, algorithm


def dataset_bytes(ds):
    """A dataset as DICOM file bytes (preamble, file meta), the same on every call."""
    import io

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_dicom_export(records, volumes_tsv, response_tsv, uid_map_tsv, imaging_dir, derivatives_dir, out_dir,
                       trial=None):
    """Write ``<out_dir>/sub-*/ses-*/{seg,sr}.dcm`` and ``export.tsv`` for every series.

    A series without a uid map row, or one that cannot be exported, gets a
    row in ``export.tsv`` with ``status`` ``not_exported`` and the reason;
    the others are exported. The folder is built aside and swapped in whole.

    Returns
    -------
    list of dict
        The ``export.tsv`` rows.
    """
    from khe_vol.files import read_tsv, replacing_dir, tsv_text

    uid_map = read_uid_map(uid_map_tsv)
    volumes = {(r["participant_id"], r["session_id"]): r for r in read_tsv(volumes_tsv)}
    responses = {(r["participant_id"], r["session_id"]): r for r in read_tsv(response_tsv)}
    rows = []
    with replacing_dir(out_dir) as tmp:
        for record in sorted(records, key=lambda r: (r["participant_id"], r["session_id"])):
            key = (record["participant_id"], record["session_id"])
            out = {"participant_id": key[0], "session_id": key[1], "status": "not_exported"}
            row = uid_map.get(key)
            if row is None:
                out["message"] = f"no row in the uid map {uid_map_tsv}: not imported from DICOM, nothing to reference"
                rows.append(out)
                continue
            out["series_instance_uid"] = row["series_instance_uid"]
            try:
                seg, sr, algorithm = export_series(record, volumes.get(key), responses.get(key), row, imaging_dir,
                                                   derivatives_dir, trial)
            except ExportError as exc:
                out["message"] = str(exc)
                rows.append(out)
                continue
            folder = Path(tmp) / key[0] / key[1]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "seg.dcm").write_bytes(dataset_bytes(seg))
            (folder / "sr.dcm").write_bytes(dataset_bytes(sr))
            out.update(status="exported", algorithm_type=algorithm, seg=f"{key[0]}/{key[1]}/seg.dcm",
                       sr=f"{key[0]}/{key[1]}/sr.dcm")
            rows.append(out)
        (Path(tmp) / "export.tsv").write_text(tsv_text(EXPORT_COLUMNS, rows, keep_spaces=True), encoding="utf-8")
    return rows
