"""DICOM SEG and SR export: round trips through highdicom on DICOM the tests write themselves."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

import highdicom as hd
from khe_vol.dicom.export import (
    AUTOMATIC,
    CATEGORY_MEANINGS,
    DEVICE_OBSERVER_UID,
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


def result_tables(results):
    """export.tsv, volumes.tsv and response.tsv of a run, each by (participant_id, session_id)."""
    import csv

    tables = []
    for name in ("dicom/export.tsv", "volumes.tsv", "response.tsv"):
        with open(results / name, newline="") as fh:
            tables.append({(r["participant_id"], r["session_id"]): r for r in csv.DictReader(fh, delimiter="\t")})
    return tuple(tables)


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
    seg = segmentation_dataset(source, mask, affine, AUTOMATIC, "sub-01", "ses-m06", 6,
                               {"sponsor_name": "KHE consortium", "protocol_id": "KHE-01"})
    path = tmp_path / "seg.dcm"
    path.write_bytes(dataset_bytes(seg))
    back, placed = seg_on_nifti_grid(path, SHAPE, affine)
    assert placed.sum() == mask.sum() > 50
    assert np.array_equal(placed, mask)
    # It references the source series and shares its frame of reference.
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in back.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in source}
    derived_from = {s.ReferencedSOPInstanceUID for f in back.PerFrameFunctionalGroupsSequence
                    for d in f.DerivationImageSequence for s in d.SourceImageSequence}
    assert derived_from <= {ds.SOPInstanceUID for ds in source} and derived_from
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
    # TID 1001: the observer (none is inherited) is khe-vol as a device; the private scheme is declared.
    by_name = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in items if "ConceptNameCodeSequence" in i}
    assert by_name["Observer Type"].ConceptCodeSequence[0].CodeValue == codes.DCM.Device.value
    assert by_name["Device Observer UID"].UID == DEVICE_OBSERVER_UID
    assert [s.CodingSchemeDesignator for s in back.CodingSchemeIdentificationSequence] == ["99KHEVOL"]


TRIAL_SUBJECT = ("ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
                 "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID")


@pytest.mark.parametrize("trial", [{"sponsor_name": "KHE consortium", "protocol_id": "KHE-01", "site_id": "03"}, None])
def test_clinical_trial_attributes_are_complete_or_left_out(tmp_path, trial):
    """The time point is always there; the subject module only with its Type 1 sponsor and protocol id."""
    source, affine = write_case(tmp_path, "oblique")
    seg = segmentation_dataset(source, lesion(SHAPE, affine, centre_ras(SHAPE, affine)), affine, AUTOMATIC,
                               "sub-01", "ses-m06", 6, trial)
    sr = sr_dataset(seg, source, "1.5", "20.0", "sub-01", "ses-m06", 6, category="growth", trial=trial)
    for ds in (seg, sr):
        back = pydicom.dcmread(__import__("io").BytesIO(dataset_bytes(ds)))
        assert (back.ClinicalTrialTimePointID, back.ClinicalTrialTimePointDescription) == ("m06", "month 6")
        if trial:
            assert (back.ClinicalTrialSponsorName, back.ClinicalTrialProtocolID, back.ClinicalTrialSiteID,
                    back.ClinicalTrialSubjectID) == ("KHE consortium", "KHE-01", "03", "01")
            assert "ClinicalTrialProtocolName" in back and "ClinicalTrialSiteName" in back  # Type 2: present
        else:  # never an empty Type 1 sponsor / protocol id
            assert not [k for k in TRIAL_SUBJECT if k in back]


def test_dicom_export_true_needs_the_uid_map(tmp_path):
    from khe_vol.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="dicom_uid_map"):
        validate_config({"imaging_dir": str(tmp_path), "dicom_export": True})
    assert validate_config({"imaging_dir": str(tmp_path)})["dicom_export"] is False


@pytest.mark.slow
def test_workflow_writes_seg_and_sr_that_match_the_tables(tmp_path):
    """A real Snakemake run with dicom_export on a study whose NIfTI came from DICOM the test wrote."""
    import json

    import nibabel as nib
    import yaml

    from khe_vol.files import write_tsv
    from tests.cohort import write_mask_cohort
    from tests.dicom_series import uid_map_row
    from tests.test_workflow import run_snakemake

    root = tmp_path / "study"
    config_path = write_mask_cohort(root)
    rows = []
    for nifti in sorted((root / "imaging").rglob("*_T2w.nii.gz")):
        pid, ses = nifti.name.split("_")[:2]
        img = nib.load(nifti)
        enhanced = pid == "sub-02"  # sub-02: oblique, flipped, one multi-frame file, frames along i, reversed
        datasets = series_datasets(np.asarray(img.dataobj), img.affine, f"{pid}{ses}",
                                   frame_axis=0 if enhanced else 2, reverse=enhanced)
        dicom_dir = root / "dicom" / f"{pid}_{ses}"
        files = write_series(dicom_dir, datasets, enhanced=enhanced, name=f"{pid}{ses}")
        if (pid, ses) != ("sub-02", "ses-m12"):  # one series not imported from DICOM
            rows.append(uid_map_row(pid, ses, str(nifti.relative_to(root / "imaging")), dicom_dir, files, datasets))
    uid_map = root / "dicom_uids.tsv"
    write_tsv(uid_map, list(rows[0]), rows, keep_spaces=True)  # the project's TSV format, as khe-vol import writes
    config = yaml.safe_load(config_path.read_text())
    config.update(dicom_export=True, dicom_uid_map=str(uid_map), dicom_trial={"sponsor_name": "KHE consortium",
                                                                               "protocol_id": "KHE-01"})
    config_path.write_text(yaml.safe_dump(config))

    run_snakemake(root / "work", config_path)
    results = root / "results"

    export, volumes, response = result_tables(results)
    assert export[("sub-02", "ses-m12")]["status"] == "not_exported"
    assert "uid map" in export[("sub-02", "ses-m12")]["message"]
    exported = [key for key, row in export.items() if row["status"] == "exported"]
    assert len(exported) == 5
    for pid, ses in exported:
        assert export[(pid, ses)]["algorithm_type"] == MANUAL  # reader masks from masks_dir
        derivative = nib.load(results / f"derivatives/{pid}/{ses}/anat/{pid}_{ses}_label-lesion_mask.nii.gz")
        seg, placed = seg_on_nifti_grid(results / f"dicom/{pid}/{ses}/seg.dcm", derivative.shape, derivative.affine)
        assert np.array_equal(placed, np.asarray(derivative.dataobj))
        assert seg.ClinicalTrialSponsorName == "KHE consortium" and seg.ClinicalTrialTimePointID == ses[4:]
        sr = hd.sr.srread(results / f"dicom/{pid}/{ses}/sr.dcm")
        group = sr.content.get_volumetric_roi_measurement_groups()[0]
        volume = group.get_measurements(name=codes.SCT.Volume)[0]
        # The same number as volumes.tsv (DS drops its trailing zeros: 4.189000 -> 4.189).
        assert float(volume[0].MeasuredValueSequence[0].NumericValue) == float(volumes[(pid, ses)]["volume_ml"])
        evaluations = {e.name.value: e.value.value for e in group.get_qualitative_evaluations()}
        expected = response.get((pid, ses), {}).get("category")
        assert evaluations.get("response_vs_baseline") == expected
    empty = export[("sub-01", "ses-m12")]  # the reader's empty follow-up mask: 0 mL, exported as such
    assert empty["status"] == "exported" and float(volumes[("sub-01", "ses-m12")]["volume_ml"]) == 0

    before = {p: p.read_bytes() for p in (results / "dicom").rglob("*") if p.is_file()}
    run_snakemake(root / "work", config_path, "--forcerun", "dicom_export")
    after = {p: p.read_bytes() for p in (results / "dicom").rglob("*") if p.is_file()}
    assert before == after
    lint = run_snakemake(root / "lint", config_path, "--lint", check=False)  # dicom.smk included
    assert lint.returncode == 0 and "Lints for" not in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    assert json.loads((results / "provenance.json").read_text())


def test_the_final_mask_is_the_deciding_readers(tmp_path):
    from khe_vol.dicom.export import final_mask_path

    base = {"participant_id": "sub-01", "session_id": "ses-m06"}
    assert final_mask_path({**base, "volume_source": "R2:edited"}, tmp_path).name == \
        "sub-01_ses-m06_desc-R2_label-lesion_mask.nii.gz"
    assert final_mask_path({**base, "volume_source": "R2:accept"}, tmp_path).name == \
        "sub-01_ses-m06_label-lesion_mask.nii.gz"
    assert final_mask_path({**base, "volume_source": "auto"}, tmp_path).name == "sub-01_ses-m06_label-lesion_mask.nii.gz"
    assert final_mask_path({**base, "volume_source": "R1:no_residual_lesion"}, tmp_path) is None


def test_a_uid_map_row_for_another_series_is_refused(tmp_path):
    """The SEG never references UIDs of a series other than the one measured."""
    import json

    from khe_vol.dicom.export import export_series
    from tests.conftest import save_nifti
    from tests.dicom_series import uid_map_row

    source, affine = write_case(tmp_path, "oblique")
    nifti = save_nifti(tmp_path / "imaging/sub-01/ses-m06/anat/sub-01_ses-m06_T2w.nii.gz", np.ones(SHAPE), affine)
    record = {"participant_id": "sub-01", "session_id": "ses-m06", "month": 6, "status": "ok", "method": "auto",
              "seed_source": "seeds_file", "source_file": str(nifti), "shape": list(SHAPE), "affine": affine.tolist()}
    volume_row = {"status": "ok", "volume_ml": "1.000000", "max_diameter_cm": "2.00", "review_reason": "n/a"}
    files = sorted(p.name for p in (tmp_path / "oblique").iterdir())
    row = uid_map_row("sub-01", "ses-m06", "sub-01/ses-m12/anat/sub-01_ses-m12_T2w.nii.gz", tmp_path / "oblique",
                      files, source)
    with pytest.raises(ExportError, match="is not the series measured"):
        export_series(record, volume_row, None, row, tmp_path / "imaging", tmp_path / "derivatives")
    save_nifti(tmp_path / "derivatives/sub-01/ses-m06/anat/sub-01_ses-m06_label-lesion_mask.nii.gz",
               lesion(SHAPE, affine, centre_ras(SHAPE, affine)), affine)
    row = {**uid_map_row("sub-01", "ses-m06", "sub-01/ses-m06/anat/sub-01_ses-m06_T2w.nii.gz", tmp_path / "oblique",
                         files, source), "series_instance_uid": "1.2.3.4"}
    with pytest.raises(ExportError, match="not 1.2.3.4"):
        export_series(record, volume_row, None, row, tmp_path / "imaging", tmp_path / "derivatives")
    assert json.loads(row["dicom_files"]) == files


@pytest.mark.slow
def test_khe_vol_import_then_the_workflow_exports_onto_the_original_dicom(tmp_path, capsys):
    """The contract between import and export: the uid map `khe-vol import` writes, then a real Snakemake run.

    A baseline as single-frame files (axial LPS, oblique) and a follow-up as one enhanced multi-frame file:
    each SEG references the original series and instances and gives the derivative mask back exactly
    on its grid; each SR holds the volume of volumes.tsv and the follow-up's category of response.tsv.
    """
    import nibabel as nib
    import yaml

    from khe_vol.cli import main
    from khe_vol.synthetic.seeds import reader_seeds_ras_mm
    from khe_vol.synthetic.dicom import (StudyInfo, SeriesInfo, small_phantom, stored_values, write_enhanced_series,
                                     write_single_frame_series)
    from tests.test_workflow import run_snakemake

    t2 = SeriesInfo()
    studies = {}
    for ses, orientation, enhanced, volume_ml, date in (("baseline", "axial_lps", False, 10.0, "20240110"),
                                                        ("m06", "axial_ras", True, 6.0, "20240712")):
        ph = small_phantom(rng_seed=1, orientation=orientation, oblique_deg=12.0, lesion_volume_ml=volume_ml)
        stored, slope, intercept = stored_values(ph.image)
        study = studies[ses] = StudyInfo(f"exp{ses}", study_date=date, accession_number=f"ACC{ses.upper()}")
        writer = write_enhanced_series if enhanced else write_single_frame_series
        writer(tmp_path / "site" / ses, stored, ph.affine, slope, intercept, study, t2)
        if ses == "baseline":
            seed = reader_seeds_ras_mm(ph.truth_mask, ph.affine, np.random.default_rng(5))[0]
    (tmp_path / "visits.tsv").write_text("participant_id\tsession_id\taccession_number\n"
                                         + "".join(f"01\t{ses}\t{s.accession_number}\n" for ses, s in studies.items()))
    (tmp_path / "seeds.tsv").write_text("participant_id\tx\ty\tz\nsub-01\t" + "\t".join(f"{v:.2f}" for v in seed) + "\n")
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "imaging_dir": str(tmp_path / "study/imaging"), "seeds": str(tmp_path / "seeds.tsv"),
        "sessions": {"baseline": 0, "m06": 6}, "results_dir": str(tmp_path / "results"), "dicom_export": True,
        "dicom_uid_map": str(tmp_path / "study/dicom_uids.tsv"),
        "dicom_trial": {"sponsor_name": "KHE consortium", "protocol_id": "KHE-01"}}))
    assert main(["import", str(tmp_path / "site"), "--out", str(tmp_path / "study/imaging"),
                 "--visits", str(tmp_path / "visits.tsv"), "--config", str(config)]) == 0, capsys.readouterr()

    run_snakemake(tmp_path / "work", config)
    results = tmp_path / "results"

    export, volumes, response = result_tables(results)
    for ses, study in studies.items():
        key = ("sub-01", f"ses-{ses}")
        assert export[key]["status"] == "exported" and export[key]["algorithm_type"] == AUTOMATIC, export[key]
        originals = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((tmp_path / "site" / ses).iterdir())]
        derivative = nib.load(results / f"derivatives/sub-01/ses-{ses}/anat/sub-01_ses-{ses}_label-lesion_mask.nii.gz")
        seg, placed = seg_on_nifti_grid(results / f"dicom/sub-01/ses-{ses}/seg.dcm", derivative.shape,
                                        derivative.affine)
        assert placed.any() and np.array_equal(placed, np.asarray(derivative.dataobj))
        referenced = seg.ReferencedSeriesSequence[0]
        assert referenced.SeriesInstanceUID == t2.series_instance_uid(study) == originals[0].SeriesInstanceUID
        assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
            ds.SOPInstanceUID for ds in originals}
        assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (study.study_instance_uid,
                                                                   originals[0].FrameOfReferenceUID)
        assert seg.ClinicalTrialTimePointID == ses and seg.ClinicalTrialSubjectID == "01"
        group = hd.sr.srread(results / f"dicom/sub-01/ses-{ses}/sr.dcm").content \
            .get_volumetric_roi_measurement_groups()[0]
        volume = group.get_measurements(name=codes.SCT.Volume)[0]
        assert float(volume[0].MeasuredValueSequence[0].NumericValue) == float(volumes[key]["volume_ml"]) > 0
        evaluations = {e.name.value: e.value.value for e in group.get_qualitative_evaluations()}
        assert evaluations.get("response_vs_baseline") == response.get(key, {}).get("category")
    assert response[("sub-01", "ses-m06")]["category"] in CATEGORY_MEANINGS
