"""DICOM SEG and SR export: round trips through highdicom on DICOM the tests write themselves."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

import highdicom as hd
from khe_vol.dicom.export import (
    AUTOMATIC,
    MANUAL,
    SEMIAUTOMATIC,
    ExportError,
    algorithm_type,
    dataset_bytes,
    segmentation_dataset,
    sr_dataset,
)
from tests.conftest import make_affine, rotation
from tests.dicom_series import LPS, series_datasets, write_series

SHAPE = (20, 18, 9)


def lesion(shape, affine, centre_ras_mm, radius_mm=6.0):
    """An irregular lesion mask (ball plus a lobe) on a grid, by physical position."""
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    inside = np.linalg.norm(xyz - centre_ras_mm, axis=1) < radius_mm
    inside |= np.linalg.norm(xyz - centre_ras_mm - [4.0, 3.0, 0.0], axis=1) < radius_mm / 2
    return inside.reshape(shape).astype(np.uint8)


def centre_ras(shape, affine):
    return (affine @ np.array([*(np.asarray(shape) - 1) / 2, 1.0]))[:3]


# name -> (affine, frame_axis, reverse, enhanced): the DICOM variants tested.
CASES = {
    # dcm2niix's NIfTI of an axial LPS acquisition: x and y flipped against the DICOM rows / columns
    "axial_lps": (make_affine((0.8, 0.8, 3.0), (30, 40, -12), flips=(-1, -1, 1)), 2, False, False),
    "oblique": (make_affine((0.9, 0.7, 2.5), (-5, 12, 30), rot=rotation("x", 17) @ rotation("z", -24)), 2, False, False),
    # frames along the NIfTI's first array axis, last index first: array axes differ from frame order
    "frames_along_i_reversed": (make_affine((1.0, 0.9, 2.0), (-9, -7, 3), rot=rotation("y", 11)), 0, True, False),
    "enhanced_multiframe_oblique": (make_affine((0.9, 0.8, 3.0), (1, 2, 3), rot=rotation("z", 31)), 1, True, True),
}


def write_case(tmp_path, name):
    affine, frame_axis, reverse, enhanced = CASES[name]
    rng = np.random.default_rng(3)
    data = rng.integers(50, 900, SHAPE)
    datasets = series_datasets(data, affine, name, frame_axis=frame_axis, reverse=reverse)
    files = write_series(tmp_path / name, datasets, enhanced=enhanced, name=name)
    source = [pydicom.dcmread(tmp_path / name / f) for f in files]
    return source, affine


def seg_on_nifti_grid(seg_path, shape, affine):
    """Read a SEG back (highdicom) and place each frame on the NIfTI grid by its own frame position."""
    seg = hd.seg.segread(seg_path)
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    spacing = np.array(shared.PixelMeasuresSequence[0].PixelSpacing, float)
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    out = np.zeros(shape, np.uint8)
    inv = np.linalg.inv(affine)
    r, c = np.indices((seg.Rows, seg.Columns))
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        ipp = np.array(item.PlanePositionSequence[0].ImagePositionPatient, float)
        lps = ipp + c[..., None] * spacing[1] * iop[:3] + r[..., None] * spacing[0] * iop[3:]
        ijk = (LPS @ lps.reshape(-1, 3).T).T @ inv[:3, :3].T + inv[:3, 3]
        idx = np.rint(ijk).astype(int)
        assert np.abs(ijk - idx).max() < 1e-3, "SEG frame pixels fall between NIfTI voxels"
        out[tuple(idx.T)] = frame.reshape(-1)
    return seg, out


@pytest.mark.parametrize("name", sorted(CASES))
def test_seg_round_trip_gives_the_mask_back_exactly(tmp_path, name):
    source, affine = write_case(tmp_path, name)
    mask = lesion(SHAPE, affine, centre_ras(SHAPE, affine))
    seg = segmentation_dataset(source, mask, affine, AUTOMATIC, "sub-01", "ses-m06", 6)
    path = tmp_path / "seg.dcm"
    path.write_bytes(dataset_bytes(seg))
    back, placed = seg_on_nifti_grid(path, SHAPE, affine)
    assert placed.sum() == mask.sum() > 50
    assert np.array_equal(placed, mask)
    # It references the source series and shares its frame of reference.
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    assert back.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert back.StudyInstanceUID == source[0].StudyInstanceUID
    desc = back.SegmentSequence[0]
    assert desc.SegmentLabel == "lesion"
    assert desc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "4147007"
    assert desc.SegmentAlgorithmType == "AUTOMATIC"
    assert desc.SegmentAlgorithmName == "khe-vol"
    assert back.ClinicalTrialSubjectID == "01"
    assert back.ClinicalTrialTimePointID == "m06"
    assert back.ClinicalTrialTimePointDescription == "month 6"


def test_seg_and_sr_bytes_are_the_same_on_every_run(tmp_path):
    source, affine = write_case(tmp_path, "oblique")
    mask = lesion(SHAPE, affine, centre_ras(SHAPE, affine))
    runs = []
    for _ in range(2):
        seg = segmentation_dataset(source, mask, affine, AUTOMATIC, "sub-01", "ses-baseline", 0)
        sr = sr_dataset(seg, source, "1.234567", "31.2", "sub-01", "ses-baseline", 0)
        runs.append((dataset_bytes(seg), dataset_bytes(sr)))
    assert runs[0] == runs[1]
    # Another mask is another SEG instance.
    other = segmentation_dataset(source, np.roll(mask, 1, axis=0), affine, AUTOMATIC, "sub-01", "ses-baseline", 0)
    assert other.SOPInstanceUID != pydicom.dcmread(__import__("io").BytesIO(runs[0][0])).SOPInstanceUID


def test_a_source_off_the_mask_grid_is_refused(tmp_path):
    source, affine = write_case(tmp_path, "oblique")
    mask = lesion(SHAPE, affine, centre_ras(SHAPE, affine))
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 0] * 0.5  # half a voxel along i
    with pytest.raises(ExportError, match="not on the mask's grid"):
        segmentation_dataset(source, mask, shifted, AUTOMATIC, "sub-01", "ses-m06", 6, where="dicom/sub-01")
    with pytest.raises(ExportError, match="one to one"):  # a slice missing from the DICOM series
        segmentation_dataset(source[:-1], mask, affine, AUTOMATIC, "sub-01", "ses-m06", 6)


def test_an_empty_final_mask_is_exported_as_an_empty_segment(tmp_path):
    source, affine = write_case(tmp_path, "axial_lps")
    empty = np.zeros(SHAPE, np.uint8)
    seg = segmentation_dataset(source, empty, affine, MANUAL, "sub-01", "ses-m12", 12)
    path = tmp_path / "seg.dcm"
    path.write_bytes(dataset_bytes(seg))
    back, placed = seg_on_nifti_grid(path, SHAPE, affine)
    assert not placed.any()
    assert back.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
    assert "SegmentationAlgorithmIdentificationSequence" not in back.SegmentSequence[0]


@pytest.mark.parametrize("record, expected", [
    ({"method": "auto", "seed_source": "seeds_file"}, AUTOMATIC),  # seeded from the seeds table
    ({"method": "auto", "seed_source": None, "reference_session_id": "ses-baseline"}, AUTOMATIC),  # tracked
    ({"method": "reader_mask"}, MANUAL),  # drawn by a reader, from masks_dir
    ({"method": "auto", "volume_source": "R1:accept"}, AUTOMATIC),  # a reader accepted the automatic mask
    ({"method": "auto", "volume_source": "R1:edited"}, SEMIAUTOMATIC),  # a reader edited it
    ({"method": "reader_seeded", "seed_source": "reader", "volume_source": "R2:edited"}, SEMIAUTOMATIC),  # clicks
    ({"method": "auto", "volume_source": "R1:no_residual_lesion"}, MANUAL),
    ({"method": "reader_mask", "volume_source": "R1:accept"}, MANUAL),
])
def test_algorithm_type_follows_how_the_mask_was_made(tmp_path, record, expected):
    record = {"participant_id": "sub-01", "session_id": "ses-m06", **record}
    assert algorithm_type(record) == expected
    source, affine = write_case(tmp_path, "axial_lps")
    seg = segmentation_dataset(source, lesion(SHAPE, affine, centre_ras(SHAPE, affine)), affine,
                               algorithm_type(record), "sub-01", "ses-m06", 6)
    assert seg.SegmentSequence[0].SegmentAlgorithmType == expected


def test_unknown_method_is_refused():
    with pytest.raises(ExportError, match="unknown mask method"):
        algorithm_type({"participant_id": "sub-01", "session_id": "ses-m06", "method": None})


def _content_items(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_sr_holds_volume_diameter_category_and_references_the_seg(tmp_path):
    source, affine = write_case(tmp_path, "enhanced_multiframe_oblique")
    mask = lesion(SHAPE, affine, centre_ras(SHAPE, affine))
    seg = segmentation_dataset(source, mask, affine, AUTOMATIC, "sub-01", "ses-m12", 12)
    sr = sr_dataset(seg, source, "12.345678", "45.6", "sub-01", "ses-m12", 12, category="partial_involution",
                    review_reasons=["wide_band"])
    path = tmp_path / "sr.dcm"
    path.write_bytes(dataset_bytes(sr))
    back = hd.sr.srread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    group = back.content.get_volumetric_roi_measurement_groups()[0]
    volume = group.get_measurements(name=codes.SCT.Volume)[0]
    assert volume.value == pytest.approx(12.345678, abs=0) and volume.unit.value == "ml"
    assert str(volume[0].MeasuredValueSequence[0].NumericValue) == "12.345678"  # the text volumes.tsv holds
    diameter = group.get_measurements(name=codes.SCT.Diameter)[0]
    assert diameter.value == pytest.approx(45.6) and diameter.unit.value == "mm"
    evaluations = {e.name.value: e.value for e in group.get_qualitative_evaluations()}
    assert evaluations["response_vs_baseline"].value == "partial_involution"
    assert evaluations["response_vs_baseline"].scheme_designator == "99KHEVOL"
    assert evaluations["needs_review"] == codes.SCT.Yes
    assert evaluations["review_reason"].value == "wide_band"
    # (highdicom 0.28's group.referenced_segment fails on a read SR: the items are read directly)
    items = list(_content_items(pydicom.dcmread(path)))
    refs = [i.ReferencedSOPSequence[0] for i in items if "ReferencedSOPSequence" in i]
    assert [(r.ReferencedSOPInstanceUID, r.ReferencedSegmentNumber) for r in refs] == [(seg.SOPInstanceUID, 1)]
    assert source[0].SeriesInstanceUID in [i.get("UID") for i in items]  # source series for segmentation
    assert back.ClinicalTrialTimePointID == "m12"
    texts = [str(i.get("TextValue", "")) for i in items]
    assert "m12" in texts  # the time point context
