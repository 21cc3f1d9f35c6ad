"""DICOM written by the tests themselves: the project's phantoms as a scanner would export them.

A phantom series (``khe_vol.synthetic``: an image on a RAS+ grid) becomes

* single-frame MR Image Storage files, one per slice (:func:`write_single_frame_series`), with
  ImagePositionPatient / ImageOrientationPatient in LPS as a scanner writes them, for any grid
  the phantom has (axial, sagittal, oblique, flipped axes); or
* one enhanced multi-frame MR file (:func:`write_enhanced_series`, highdicom's Legacy Converted
  Enhanced MR Image of those same slices: per-frame positions, shared orientation).

Identifying attributes (:data:`PATIENT`, a study's date, accession number, institution and
every UID) are set to values a leak scan can look for (:func:`identifying_strings`).
Deliberate faults for the import's checks: dropped slices (missing slices), moved slices
(varying spacing), slices shifted in plane (a gantry tilt) and a slice of another orientation
(a mixed series), by keyword arguments. Stored values are int16 with RescaleSlope /
RescaleIntercept (:func:`stored_values`), so the NIfTI "written directly" from the same
values (:func:`direct_nifti`) holds exactly the intensities the DICOM files hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"EMR{series.number:02d}.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    return [path]


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


def read_back(path):
    """The dataset of a written file (for tests that check what was written)."""
    return pydicom.dcmread(path)


__all__ = ["PATIENT", "StudyInfo", "SeriesInfo", "small_phantom", "stored_values", "direct_nifti",
           "slice_geometry", "single_frame_datasets", "write_single_frame_series", "write_enhanced_series",
           "identifying_strings", "uid", "replace"]
