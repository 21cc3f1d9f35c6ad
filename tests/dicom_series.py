"""A minimal MR DICOM writer for the export tests: a NIfTI-style volume as a DICOM series.

Writes the volume ``data`` (voxel -> RAS+ mm ``affine``) as single-frame MR
instances or as one legacy-converted enhanced multi-frame MR instance, with
frames taken along any array axis and in either direction, so a test can make
a series whose DICOM frame order differs from the NIfTI's array axes, oblique
or not. Every UID is derived from ``name`` (same bytes on every call).
(``khe_vol.synthetic.dicom`` is the import side's writer, of phantoms as a scanner exports them;
this one only needs to be a faithful DICOM of a given grid.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

LPS = np.diag([-1.0, -1.0, 1.0])


def _uid(*parts):
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _ds_text(values):
    return [f"{float(v):.10g}" for v in values]


def series_datasets(data, affine, name, frame_axis=2, reverse=False, row_axis=None, patient_id="KHE001",
                    study_date="20240105"):
    """Single-frame MR datasets of a volume (in frame order).

    Parameters
    ----------
    data : (I, J, K) ndarray
        Intensities (stored as uint16).
    affine : (4, 4) ndarray
        Voxel -> RAS+ mm.
    name : str
        Seeds every UID.
    frame_axis : int
        Array axis the frames step along.
    reverse : bool
        Frames from the last index to the first.
    row_axis : int, optional
        Array axis along the DICOM rows (default: the lower remaining axis is the column axis).
    """
    data = np.asarray(data)
    affine = np.asarray(affine, float)
    others = [a for a in range(3) if a != frame_axis]
    row_axis = others[1] if row_axis is None else row_axis
    col_axis = [a for a in others if a != row_axis][0]
    col_dir = LPS @ affine[:3, col_axis]  # moving along a DICOM row = next column
    row_dir = LPS @ affine[:3, row_axis]
    study_uid, series_uid, for_uid = (_uid(name, what) for what in ("study", "series", "for"))
    order = range(data.shape[frame_axis])
    order = list(reversed(order)) if reverse else list(order)
    out = []
    for n, k in enumerate(order):
        index = [0, 0, 0]
        index[frame_axis] = k
        position = LPS @ (affine @ np.array([*index, 1.0]))[:3]
        plane = np.moveaxis(np.take(data, k, axis=frame_axis), [others.index(row_axis), others.index(col_axis)],
                            [0, 1])
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = _uid(name, "instance", n)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Infant", patient_id, "20230101", "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.StudyDate, ds.StudyTime, ds.SeriesDate, ds.SeriesTime = study_date, "101500", study_date, "102000"
        ds.ContentDate, ds.ContentTime, ds.AcquisitionDate, ds.AcquisitionTime = study_date, "102000", study_date, "102000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "ACC1", ""
        ds.SeriesNumber, ds.InstanceNumber = 3, n + 1
        ds.Manufacturer, ds.SeriesDescription, ds.ProtocolName = "TestVendor", "T2 TSE ax", "T2 TSE ax"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "SK", "", "2D"
        ds.EchoTime, ds.RepetitionTime, ds.MagneticFieldStrength = "100", "4000", "1.5"
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = _ds_text(position)
        ds.ImageOrientationPatient = _ds_text([*(col_dir / np.linalg.norm(col_dir)), *(row_dir / np.linalg.norm(row_dir))])
        ds.PixelSpacing = _ds_text([np.linalg.norm(row_dir), np.linalg.norm(col_dir)])
        ds.SliceThickness = f"{np.linalg.norm(affine[:3, frame_axis]):.10g}"
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.WindowCenter, ds.WindowWidth = "500", "1000"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(np.clip(plane, 0, 65535).astype("<u2")).tobytes()
        out.append(ds)
    return out


def write_series(out_dir, datasets, enhanced=False, name="series"):
    """Write datasets to ``out_dir``; return the file names relative to it, in frame order.

    With ``enhanced`` the frames become one legacy-converted enhanced
    multi-frame MR instance (highdicom).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if enhanced:
        import highdicom as hd

        mf = hd.legacy.LegacyConvertedEnhancedMRImage(
            legacy_datasets=datasets,
            series_instance_uid=datasets[0].SeriesInstanceUID,
            series_number=int(datasets[0].SeriesNumber),
            sop_instance_uid=_uid(name, "enhanced"),
            instance_number=1,
        )
        # Keep the source series UID (the SEG references the series the uid map names).
        mf.SeriesInstanceUID = datasets[0].SeriesInstanceUID
        mf.save_as(out_dir / "enhanced.dcm", enforce_file_format=True)
        return ["enhanced.dcm"]
    names = []
    for n, ds in enumerate(datasets):
        rel = f"IM{n:04d}.dcm"
        ds.save_as(out_dir / rel, enforce_file_format=True)
        names.append(rel)
    return names


def uid_map_row(participant_id, session_id, nifti_rel, dicom_dir, files, datasets):
    """One row of the uid map (the CONTRACT with ``khe-vol import``)."""
    ds = datasets[0]
    return {
        "participant_id": participant_id,
        "session_id": session_id,
        "nifti": nifti_rel,
        "dicom_dir": str(Path(dicom_dir).resolve()),
        "dicom_files": json.dumps(list(files)),
        "study_instance_uid": ds.StudyInstanceUID,
        "series_instance_uid": ds.SeriesInstanceUID,
        "frame_of_reference_uid": ds.FrameOfReferenceUID,
        "series_description": ds.SeriesDescription,
    }
