"""Phantom series as a scanner would export them: DICOM for the import tests and the DICOM demo.

A phantom series (``khe_vol.synthetic``: an image on a RAS+ grid) becomes

* single-frame MR Image Storage files, one per slice (:func:`write_single_frame_series`), with
  ImagePositionPatient / ImageOrientationPatient in LPS as a scanner writes them, for any grid
  the phantom has (axial, sagittal, oblique, flipped axes); or
* one enhanced multi-frame MR file (:func:`write_enhanced_series`, highdicom's Legacy Converted
  Enhanced MR Image of those same slices: per-frame positions, shared orientation).

Identifying attributes (:data:`PATIENT`, a study's date, accession number, institution and
every UID) are set to values a leak scan can look for (:func:`identifying_strings`).
:func:`write_dicom_demo` writes a small site export with its visits table, seeds and config
(``khe-vol demo DIR --dicom``: the README's worked example of import and export).
Deliberate faults for the import's checks: dropped slices (missing slices), moved slices
(varying spacing), slices shifted in plane (a gantry tilt) and a slice of another orientation
(a mixed series), by keyword arguments. Stored values are int16 with RescaleSlope /
RescaleIntercept (:func:`stored_values`), so the NIfTI "written directly" from the same
values (:func:`direct_nifti`) holds exactly the intensities the DICOM files hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from khe_vol.synthetic.anatomy import make_anatomy
from khe_vol.synthetic.render import render_series
from khe_vol.synthetic.specs import SeriesSpec

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

#: The (fictitious) patient of every test study: each value must never reach imaging_dir.
PATIENT = {
    "PatientName": "Quixote^Dulcinea^Maria",
    "PatientID": "PATQX4711",
    "PatientBirthDate": "20230105",
    "PatientSex": "F",
    "OtherPatientNames": "Panza^Teresa",
    "PatientBirthName": "Aldonza^Lorenzo",
    "PatientMotherBirthName": "Nogales^Francisca",
    "PatientAddress": "Calle Ficticia 12, Toboso",
    "PatientTelephoneNumbers": "+34 555 0199",
    "IssuerOfPatientID": "SECH-MRN",
    "RequestingPhysician": "Carrasco^Sanson",
    "PhysiciansOfRecord": "Perez^Pero",
    "InstitutionName": "Sanctum Elsewhere Childrens Hospital",
    "InstitutionAddress": "Rue Imaginaire 7, Nowhereville",
    "ReferringPhysicianName": "Faustus^Johann",
    "StationName": "MRSTATION77",
    "DeviceSerialNumber": "SN998877",
}


def uid(*keys):
    """A UID that is the same for the same keys (tests are reproducible)."""
    return generate_uid(entropy_srcs=[str(k) for k in keys])


@dataclass(frozen=True)
class StudyInfo:
    """One DICOM study (a visit): its identifiers and date."""

    key: str
    study_date: str = "20240212"
    accession_number: str = "ACC55501"
    patient: dict = field(default_factory=lambda: dict(PATIENT))

    @property
    def study_instance_uid(self):
        return uid("study", self.key)


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study: its description and sequence parameters."""

    number: int = 3
    description: str = "t2_tse_fs_tra"
    echo_time_ms: float | None = 92.0
    repetition_time_ms: float | None = 4200.0
    inversion_time_ms: float | None = None
    acquisition_type: str = "2D"
    image_type: tuple = ("ORIGINAL", "PRIMARY", "M", "NORM")

    def series_instance_uid(self, study):
        return uid("series", study.key, self.number)


def small_phantom(rng_seed=0, orientation="axial_lps", oblique_deg=0.0, shape=(64, 64, 16),
                  voxel_mm=(1.2, 1.2, 3.0), lesion_volume_ml=10.0, oblique_axis=(1.0, 0.3, 0.0)):
    """A small fat-suppressed T2 phantom (image, RAS+ affine, truth) for import tests."""
    anatomy = make_anatomy(rng_seed, lesion_volume_ml=lesion_volume_ml)
    spec = SeriesSpec(shape=shape, voxel_mm=voxel_mm, orientation=orientation, oblique_deg=oblique_deg,
                      oblique_axis=oblique_axis, snr=20.0, bias_amplitude=0.2, rng_seed=rng_seed)
    return render_series(anatomy, spec)


def stored_values(image):
    """int16 stored values and (slope, intercept) so that ``stored * slope + intercept`` ~ image."""
    image = np.asarray(image, dtype=np.float64)
    # A value DICOM's decimal string (DS) holds exactly, so the DICOM and the direct NIfTI agree.
    slope = _ds(max(float(image.max()), 1.0) / 30000.0)
    stored = np.clip(np.round(image / slope), -32768, 32767).astype(np.int16)
    return stored, slope, 0.0


def direct_nifti(path, stored, slope, intercept, affine):
    """The NIfTI a site would have written itself from the same values (int16 + scl_slope)."""
    img = nib.Nifti1Image(stored, np.asarray(affine, float))
    img.header.set_slope_inter(slope, intercept)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return Path(path)


def _lps(v):
    return np.array([-v[0], -v[1], v[2]], dtype=float)


def slice_geometry(affine, transpose_in_plane=False):
    """DICOM geometry of the slices of a RAS+ grid (slices along the array's third axis).

    Returns
    -------
    dict
        ``row_dir`` / ``col_dir`` (LPS unit vectors: along a row, i.e. increasing column
        index, and down a column), ``pixel_spacing`` ([between rows, between columns] mm),
        ``position(k)`` (LPS mm of slice k's first pixel), ``slice_mm`` and ``axes``
        (array axes of DICOM columns and rows).
    """
    a = np.asarray(affine, float)
    col_axis, row_axis = (1, 0) if transpose_in_plane else (0, 1)
    row_dir = _lps(a[:3, col_axis]) / np.linalg.norm(a[:3, col_axis])
    col_dir = _lps(a[:3, row_axis]) / np.linalg.norm(a[:3, row_axis])
    return {
        "row_dir": row_dir, "col_dir": col_dir,
        "pixel_spacing": [float(np.linalg.norm(a[:3, row_axis])), float(np.linalg.norm(a[:3, col_axis]))],
        "position": lambda k: _lps(a[:3, :3] @ [0.0, 0.0, float(k)] + a[:3, 3]),
        "slice_mm": float(np.linalg.norm(a[:3, 2])),
        "axes": (col_axis, row_axis),
    }


def _ds(v):
    """A DS value pydicom accepts (at most 16 characters)."""
    return float(f"{v:.6g}")


def _slice_dataset(study, series, geom, k, pixels, slope, intercept, position, orientation, n_slices):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = uid("sop", study.key, series.number, k)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    for key, value in study.patient.items():
        setattr(ds, key, value)
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = series.series_instance_uid(study)
    ds.FrameOfReferenceUID = uid("for", study.key)
    ds.StudyID = "1"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "101500"
    ds.AccessionNumber = study.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = "CANON_MEC"
    ds.ManufacturerModelName = "Vantage Orian"
    ds.WindowCenter, ds.WindowWidth = 1500, 3000
    ds.MagneticFieldStrength = 1.5
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    ds.ProtocolName = series.description
    ds.ImageType = list(series.image_type)
    ds.ScanningSequence = "IR" if series.inversion_time_ms else "SE"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = "FS" if not series.inversion_time_ms else ""
    ds.MRAcquisitionType = series.acquisition_type
    if series.echo_time_ms is not None:
        ds.EchoTime = series.echo_time_ms
    if series.repetition_time_ms is not None:
        ds.RepetitionTime = series.repetition_time_ms
    if series.inversion_time_ms is not None:
        ds.InversionTime = series.inversion_time_ms
    ds.FlipAngle = 150
    ds.EchoTrainLength = 15
    ds.PixelBandwidth = 190
    ds.SliceThickness = _ds(geom["slice_mm"])
    ds.SpacingBetweenSlices = _ds(geom["slice_mm"])
    ds.PatientPosition = "HFS"
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.SliceLocation = _ds(float(np.dot(position, np.cross(orientation[:3], orientation[3:]))))
    ds.PixelSpacing = [_ds(v) for v in geom["pixel_spacing"]]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = _ds(slope)
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleType = "US"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


def single_frame_datasets(stored, affine, slope, intercept, study, series, *, transpose_in_plane=False,
                          drop_slices=(), move_slices_mm=None, shift_in_plane_mm_per_slice=0.0,
                          other_orientation_slices=()):
    """pydicom datasets of a series, one per slice (see :func:`write_single_frame_series`)."""
    geom = slice_geometry(affine, transpose_in_plane)
    col_axis, _ = geom["axes"]
    orientation = np.concatenate([geom["row_dir"], geom["col_dir"]])
    normal = np.cross(geom["row_dir"], geom["col_dir"])
    out = []
    for k in range(stored.shape[2]):
        if k in drop_slices:
            continue
        plane = stored[:, :, k]
        pixels = plane if col_axis == 1 else plane.T  # DICOM pixels are [row, column]
        position = geom["position"](k)
        position = position + (move_slices_mm or {}).get(k, 0.0) * normal
        position = position + k * shift_in_plane_mm_per_slice * geom["row_dir"]
        iop = orientation
        if k in other_orientation_slices:  # a slice turned 90 degrees in plane
            iop = np.concatenate([geom["col_dir"], -geom["row_dir"]])
        out.append(_slice_dataset(study, series, geom, k, pixels, slope, intercept, position, iop, stored.shape[2]))
    return out


def write_single_frame_series(folder, stored, affine, slope, intercept, study, series, **faults):
    """Write a series as MR Image Storage files, one per slice, in ``folder``.

    Parameters
    ----------
    folder : path-like
        Created if missing; files are ``IM<series><slice>.dcm`` (in slice order).
    stored : (I, J, K) int16 ndarray
        Stored values on the grid of ``affine`` (voxel -> RAS+ mm); slices along K.
    slope, intercept : float
        RescaleSlope / RescaleIntercept.
    study : StudyInfo
    series : SeriesInfo
    **faults
        ``transpose_in_plane`` (DICOM columns along J instead of I: another storage of the
        same grid), ``drop_slices`` (indices not written: missing slices),
        ``move_slices_mm`` ({k: mm along the slice normal}: varying spacing),
        ``shift_in_plane_mm_per_slice`` (positions sheared as by a gantry tilt),
        ``other_orientation_slices`` (slices turned in plane: a mixed series).

    Returns
    -------
    list of pathlib.Path
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in single_frame_datasets(stored, affine, slope, intercept, study, series, **faults):
        path = folder / f"IM{series.number:02d}{int(ds.InstanceNumber):03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced_series(folder, stored, affine, slope, intercept, study, series, **faults):
    """Write a series as one enhanced multi-frame MR file (Legacy Converted Enhanced MR Image).

    Same arguments as :func:`write_single_frame_series`; returns the one file's path.
    """
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    frames = single_frame_datasets(stored, affine, slope, intercept, study, series, **faults)
    enhanced = LegacyConvertedEnhancedMRImage(
        frames, series_instance_uid=series.series_instance_uid(study), series_number=series.number,
        sop_instance_uid=uid("enhanced", study.key, series.number), instance_number=1)
    _fix_converter_variables(enhanced, study, series)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"EMR{series.number:02d}.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    return [path]


def _fix_converter_variables(ds, study, series):
    """What highdicom's converter takes from the clock, a random UID or a set, made a function of the study.

    So the same arguments write the same bytes.
    """
    time = "101500"
    for keyword in ("InstanceCreationDate", "ContentDate"):
        if keyword in ds:
            setattr(ds, keyword, study.study_date)
    for keyword in ("InstanceCreationTime", "ContentTime"):
        if keyword in ds:
            setattr(ds, keyword, time)

    def walk(item):
        for element in item:
            if element.VR != "SQ":
                continue
            if element.keyword == "ReferencedInstanceSequence":
                element.value = sorted(element.value, key=lambda i: str(i.ReferencedSOPInstanceUID))
            for child in element.value:
                if "ContributionDateTime" in child:
                    child.ContributionDateTime = study.study_date + time
                if "DimensionOrganizationUID" in child:
                    child.DimensionOrganizationUID = uid("dimension", study.key, series.number)
                walk(child)

    walk(ds)


def identifying_strings(studies, series_list=()):
    """Every identifying value of the studies and series written: names, ids, dates, institution, UIDs.

    Person names also by each component (``Quixote``, ``Dulcinea``).
    """
    out = set()
    for study in studies:
        for key, value in study.patient.items():
            if key == "PatientSex":
                continue
            out.add(str(value))
            if key.endswith("Name") and "^" in str(value):
                out.update(p for p in str(value).split("^") if len(p) > 2)
        d = study.study_date
        out.update({d, f"{d[:4]}-{d[4:6]}-{d[6:]}", study.accession_number, study.study_instance_uid,
                    uid("for", study.key)})
        b = study.patient["PatientBirthDate"]
        out.add(f"{b[:4]}-{b[4:6]}-{b[6:]}")
        for series in series_list:
            out.add(series.series_instance_uid(study))
    return sorted(out)


#: The DICOM demo: (participant, storage, orientation, oblique degrees) and its visits
#: (session, lesion mL, study date). Participant 01's series are single-frame files, 02's one
#: enhanced multi-frame file each; every study also holds a T1 series the T2 rule leaves out.
DICOM_DEMO_PARTICIPANTS = (("01", "single-frame", "axial_lps", 12.0), ("02", "enhanced", "axial_ras", 15.0))
DICOM_DEMO_VISITS = (("baseline", 20.0, "20240110"), ("m06", 12.0, "20240712"))


def write_dicom_demo(out_dir, rng_seed=0):
    """Write a small site export and what a study needs to import it and export DICOM back.

    Layout under ``out_dir``::

        site_export/P<nn>/<visit>/*.dcm   the T2 (and a T1) of each visit, as a scanner exports them
        visits.tsv   participant_id session_id accession_number
        seeds.tsv    baseline seeds (scanner RAS+ mm, where a reader clicks)
        study.yaml   imaging_dir study/imaging, seeds, sessions, dicom_export with the uid map
                     study/dicom_uids.tsv (paths relative to ``out_dir``: run from there)
        truth.tsv    participant_id session_id true_volume_ml

    Returns
    -------
    pathlib.Path
        ``out_dir``.
    """
    import yaml

    from khe_vol.files import atomic_write_text
    from khe_vol.synthetic.seeds import reader_seeds_ras_mm

    out = Path(out_dir)
    t2 = SeriesInfo()
    t1 = SeriesInfo(number=2, description="t1_tse_tra", echo_time_ms=12.0, repetition_time_ms=550.0)
    visits, seeds = ["participant_id\tsession_id\taccession_number"], ["participant_id\tx\ty\tz"]
    truth = ["participant_id\tsession_id\ttrue_volume_ml"]
    for pid, storage, orientation, oblique in DICOM_DEMO_PARTICIPANTS:
        for ses, volume_ml, date in DICOM_DEMO_VISITS:
            ph = small_phantom(rng_seed=rng_seed + int(pid), orientation=orientation, oblique_deg=oblique,
                               shape=(96, 96, 20), voxel_mm=(1.0, 1.0, 3.0), lesion_volume_ml=volume_ml)
            stored, slope, intercept = stored_values(ph.image)
            accession = f"ACC{pid}{ses.upper()}"
            study = StudyInfo(f"demo{rng_seed}-{pid}-{ses}", study_date=date, accession_number=accession,
                              patient={**PATIENT, "PatientID": f"PATQX47{pid}"})
            folder = out / "site_export" / f"P{pid}" / ses
            writer = write_enhanced_series if storage == "enhanced" else write_single_frame_series
            writer(folder, stored, ph.affine, slope, intercept, study, t2)
            write_single_frame_series(folder, stored, ph.affine, slope, intercept, study, t1)
            visits.append(f"{pid}\t{ses}\t{accession}")
            truth.append(f"sub-{pid}\tses-{ses}\t{ph.true_volume_ml:.6f}")
            if ses == "baseline":
                seed = reader_seeds_ras_mm(ph.truth_mask, ph.affine, np.random.default_rng(rng_seed + 5))[0]
                seeds.append(f"sub-{pid}\t" + "\t".join(f"{v:.2f}" for v in seed))
    for name, rows in (("visits.tsv", visits), ("seeds.tsv", seeds), ("truth.tsv", truth)):
        atomic_write_text(out / name, "\n".join(rows) + "\n")
    config = {"imaging_dir": "study/imaging", "seeds": "seeds.tsv", "sessions": {"baseline": 0, "m06": 6},
              "results_dir": "results", "dicom_export": True, "dicom_uid_map": "study/dicom_uids.tsv",
              "dicom_trial": {"sponsor_name": "KHE consortium", "protocol_id": "KHE-DEMO", "site_id": "01"}}
    atomic_write_text(out / "study.yaml", yaml.safe_dump(config, sort_keys=False))
    return out


__all__ = ["PATIENT", "StudyInfo", "SeriesInfo", "small_phantom", "stored_values", "direct_nifti",
           "slice_geometry", "single_frame_datasets", "write_single_frame_series", "write_enhanced_series",
           "identifying_strings", "uid", "write_dicom_demo"]
