"""`khe-vol import`: DICOM written from phantoms (single-frame, enhanced multi-frame, oblique, LPS) into imaging_dir.

Each test writes its own DICOM (khe_vol/synthetic/dicom.py), runs the real command (dcm2niix from
the PyPI package) and checks the files it wrote.
"""

import gzip
import json
import os

import numpy as np
import pytest
import yaml
from scipy.ndimage import binary_dilation

from khe_vol.check import check_study
from khe_vol.cli import main
from khe_vol.config import load_config
from khe_vol.dicom.series import scan_folder
from khe_vol.files import read_tsv
from khe_vol.geometry import voxel_volume_mm3
from khe_vol.nifti import load_series
from khe_vol.qa.audit import nifti_text_fields
from khe_vol.qa.leaks import DATE_RE
from khe_vol.series import measure_series
from khe_vol.synthetic.seeds import reader_seeds_ras_mm
from khe_vol.synthetic.dicom import (
    PATIENT,
    SeriesInfo,
    StudyInfo,
    direct_nifti,
    identifying_strings,
    small_phantom,
    stored_values,
    write_enhanced_series,
    write_single_frame_series,
)

T2 = SeriesInfo()
T1 = SeriesInfo(number=2, description="t1_tse_tra", echo_time_ms=12.0, repetition_time_ms=550.0)
STIR = SeriesInfo(number=4, description="STIR_cor", echo_time_ms=45.0, repetition_time_ms=5200.0,
                  inversion_time_ms=160.0)


@pytest.fixture(scope="module")
def phantom():
    ph = small_phantom(rng_seed=1, orientation="axial_lps", oblique_deg=12.0)
    stored, slope, intercept = stored_values(ph.image)
    return ph, stored, slope, intercept


def visits_by_uid(path, rows):
    """visits.tsv keyed by study_instance_uid: rows of (participant, session, StudyInfo)."""
    lines = ["participant_id\tsession_id\tstudy_instance_uid"]
    lines += [f"{pid}\t{ses}\t{study.study_instance_uid}" for pid, ses, study in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_import(tmp_path, *extra, visits=None):
    args = ["import", str(tmp_path / "dicom"), "--out", str(tmp_path / "study" / "imaging"),
            "--visits", str(visits or tmp_path / "visits.tsv"), *map(str, extra)]
    return main(args)


def report_rows(tmp_path):
    return read_tsv(tmp_path / "study" / "import_report.tsv")


def t2_path(tmp_path, pid, ses):
    return tmp_path / "study" / "imaging" / f"sub-{pid}" / f"ses-{ses}" / "anat" / f"sub-{pid}_ses-{ses}_T2w.nii.gz"


def write_study(folder, phantom, study, series=T2, enhanced=False, **faults):
    ph, stored, slope, intercept = phantom
    writer = write_enhanced_series if enhanced else write_single_frame_series
    return writer(folder, stored, ph.affine, slope, intercept, study, series, **faults)


VARIANTS = {
    # name: (phantom orientation, oblique degrees, enhanced, DICOM columns along the array's j axis)
    "single-frame axial LPS oblique": ("axial_lps", 12.0, False, False),
    "single-frame sagittal, transposed storage": ("sagittal", 7.0, False, True),
    "enhanced multi-frame oblique": ("axial_ras", 15.0, True, False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_import_measures_like_the_nifti_written_directly(tmp_path, variant, capsys):
    orientation, oblique, enhanced, transpose = VARIANTS[variant]
    ph = small_phantom(rng_seed=1, orientation=orientation, oblique_deg=oblique, shape=(96, 96, 20),
                       voxel_mm=(1.0, 1.0, 3.0), lesion_volume_ml=20.0)
    stored, slope, intercept = stored_values(ph.image)
    study = StudyInfo("measure")
    writer = write_enhanced_series if enhanced else write_single_frame_series
    writer(tmp_path / "dicom", stored, ph.affine, slope, intercept, study, T2, transpose_in_plane=transpose)
    visits_by_uid(tmp_path / "visits.tsv", [("01", "baseline", study)])
    assert run_import(tmp_path) == 0, capsys.readouterr()
    imported = t2_path(tmp_path, "01", "baseline")
    direct = direct_nifti(tmp_path / "direct" / "direct_T2w.nii.gz", stored, slope, intercept, ph.affine)

    # The same physical grid: every voxel of the direct NIfTI is a voxel of the imported one, same value
    # (dcm2niix re-quantises an enhanced file's values to int16 with its own slope: 1e-4 of the range).
    a, b = load_series(imported), load_series(direct)
    m = np.linalg.inv(a.affine) @ b.affine
    assert np.allclose(m, np.round(m), atol=1e-3), m
    ijk = np.indices(b.data.shape).reshape(3, -1)
    idx = (np.round(m[:3, :3]) @ ijk + np.round(m[:3, 3])[:, None]).astype(int)
    assert np.allclose(a.data[idx[0], idx[1], idx[2]], b.data.reshape(-1), rtol=0, atol=1e-4 * b.data.max())

    # Through the workflow's series measurement: a reader's mask (the truth, on the phantom's own grid,
    # brought onto each series grid by physical position) gives the same voxels...
    truth = direct_nifti(tmp_path / "truth" / "truth_mask.nii.gz", ph.truth_mask.astype(np.int16), 1.0, 0.0, ph.affine)
    by_mask = [measure_series("sub-01", "ses-baseline", 0, path, reader_mask_path=truth)[0] for path in (imported, direct)]
    assert by_mask[0]["status"] == by_mask[1]["status"] == "ok"
    assert by_mask[0]["n_voxels"] == by_mask[1]["n_voxels"] == int(ph.truth_mask.sum())
    # ... and the seeded segmentation (a reader-like seed, RAS+ mm) agrees within one voxel's partial volume:
    # at most the one-voxel shell around the lesion (the segmentation is not bit-identical on a
    # flipped array order, see the README).
    seed = reader_seeds_ras_mm(ph.truth_mask, ph.affine, np.random.default_rng(5))[0]
    (rec_imported, _, _), (rec_direct, mask_direct, _) = (
        measure_series("sub-01", "ses-baseline", 0, path, seed_ras_mm=seed) for path in (imported, direct))
    assert rec_imported["status"] == rec_direct["status"] == "ok", (rec_imported["message"], rec_direct["message"])
    voxel_ml = voxel_volume_mm3(ph.affine) / 1000
    shell_ml = int((binary_dilation(mask_direct) & ~mask_direct.astype(bool)).sum()) * voxel_ml
    assert abs(rec_imported["volume_ml"] - rec_direct["volume_ml"]) <= shell_ml
    assert abs(rec_imported["volume_ml"] - ph.true_volume_ml) < 0.1 * ph.true_volume_ml

    seeds = tmp_path / "seeds.tsv"
    seeds.write_text("participant_id\tx\ty\tz\nsub-01\t" + "\t".join(f"{v:.2f}" for v in seed) + "\n")
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"imaging_dir": str(tmp_path / "study" / "imaging"), "seeds": str(seeds),
                                      "sessions": {"baseline": 0, "m06": 6},
                                      "results_dir": str(tmp_path / "results")}))
    assert check_study(load_config(config)) == []


def test_uid_map_report_and_no_identifier_under_imaging_dir(tmp_path, phantom, capsys):
    base, follow = StudyInfo("b"), StudyInfo("f", study_date="20240903", accession_number="ACC55502")
    write_study(tmp_path / "dicom" / "visit1", phantom, base)
    write_study(tmp_path / "dicom" / "visit1", phantom, base, T1)
    write_study(tmp_path / "dicom" / "visit2", phantom, follow, enhanced=True)
    visits_by_uid(tmp_path / "visits.tsv", [("sub-07", "ses-baseline", base), ("07", "m06", follow)])
    assert run_import(tmp_path) == 0
    out = capsys.readouterr().out
    assert "* series 3 't2_tse_fs_tra'" in out and "- series 2 't1_tse_tra'" in out  # every candidate, the choice

    uid_map = read_tsv(tmp_path / "study" / "dicom_uids.tsv")
    assert [(r["participant_id"], r["session_id"]) for r in uid_map] == [("sub-07", "ses-baseline"),
                                                                         ("sub-07", "ses-m06")]
    row = uid_map[0]
    assert row["nifti"] == "sub-07/ses-baseline/anat/sub-07_ses-baseline_T2w.nii.gz"
    assert row["dicom_dir"] == str((tmp_path / "dicom").resolve())
    files = json.loads(row["dicom_files"])
    assert files == [f"visit1/IM03{k:03d}.dcm" for k in range(1, 17)]  # slice order
    assert row["study_instance_uid"] == base.study_instance_uid
    assert row["series_instance_uid"] == T2.series_instance_uid(base)
    assert row["series_description"] == "t2_tse_fs_tra"
    assert (row["study_date"], uid_map[1]["study_date"]) == (base.study_date, "20240903")  # khe-vol check's order
    assert json.loads(uid_map[1]["dicom_files"]) == ["visit2/EMR03.dcm"]
    report = report_rows(tmp_path)
    assert {(r["series_number"], r["candidate"], r["chosen"]) for r in report} == {("2", "0", "0"), ("3", "1", "1")}
    assert "EchoTime" in json.loads((tmp_path / "study/imaging/sub-07/ses-m06/anat/sub-07_ses-m06_T2w.json")
                                    .read_text())

    # Every identifying attribute the phantoms write is one the import looks for (the leak scan's list);
    # the single-frame files hold them all (highdicom's enhanced conversion drops a few).
    single = [s for s in scan_folder(tmp_path / "dicom")[0] if not s.multiframe]
    assert len(single) == 2 and all(
        {str(v) for k, v in base.patient.items() if k != "PatientSex"} <= s.identifying for s in single)
    forbidden = identifying_strings([base, follow], [T2, T1])
    files = sorted(p for p in (tmp_path / "study" / "imaging").rglob("*") if p.is_file())
    assert len(files) == 4
    for path in files:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("latin-1")
        for token in forbidden:
            assert token.lower() not in text.lower(), (path, token)
        assert not DATE_RE.search(path.read_text() if path.suffix == ".json" else ""), path
        if path.suffix == ".gz":
            for field, value in nifti_text_fields(raw):
                assert value.strip() == "", (path, field, value)


def test_rerun_same_bytes_and_force(tmp_path, phantom, capsys):
    study = StudyInfo("r")
    write_study(tmp_path / "dicom", phantom, study)
    visits_by_uid(tmp_path / "visits.tsv", [("01", "baseline", study)])
    before = sorted(p.name for p in (tmp_path / "dicom").iterdir())
    dicom_bytes = {p.name: p.read_bytes() for p in (tmp_path / "dicom").iterdir()}
    umask = os.umask(0o022)
    try:
        assert run_import(tmp_path) == 0
    finally:
        os.umask(umask)
    target = t2_path(tmp_path, "01", "baseline")
    first = {p: p.read_bytes() for p in (tmp_path / "study").rglob("*") if p.is_file()}
    # The study's others read what was imported: files follow the umask (022 -> 0644).
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in first if p.stat().st_mode & 0o777 != 0o644} == {}
    assert run_import(tmp_path) == 0
    assert {p: p.read_bytes() for p in (tmp_path / "study").rglob("*") if p.is_file()} == {
        p: b for p, b in first.items() if p.name != "import_report.tsv"} | {
        tmp_path / "study/import_report.tsv": (tmp_path / "study/import_report.tsv").read_bytes()}
    assert report_rows(tmp_path)[0]["study_status"] == "unchanged"
    assert {p.name: p.read_bytes() for p in (tmp_path / "dicom").iterdir()} == dicom_bytes  # inputs untouched
    assert sorted(p.name for p in (tmp_path / "dicom").iterdir()) == before

    target.write_bytes(b"someone else's file")
    capsys.readouterr()
    assert run_import(tmp_path) == 1
    assert "--force" in capsys.readouterr().out
    assert target.read_bytes() == b"someone else's file"
    assert run_import(tmp_path, "--force") == 0
    assert target.read_bytes() == first[target]


def test_two_t2_series_is_an_error_naming_both_and_other_studies_convert(tmp_path, phantom, capsys):
    ambiguous, fine = StudyInfo("amb"), StudyInfo("ok", study_date="20240301", accession_number="ACC55509")
    write_study(tmp_path / "dicom" / "a", phantom, ambiguous)
    write_study(tmp_path / "dicom" / "a", phantom, ambiguous, STIR)
    write_study(tmp_path / "dicom" / "b", phantom, fine)
    visits_by_uid(tmp_path / "visits.tsv", [("01", "baseline", ambiguous), ("02", "baseline", fine)])
    assert run_import(tmp_path) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("sub-01 ses-baseline"))
    assert "failed" in line and "series 3 't2_tse_fs_tra'" in line and "series 4 'STIR_cor'" in line, line
    assert not t2_path(tmp_path, "01", "baseline").parent.exists()
    assert t2_path(tmp_path, "02", "baseline").is_file()
    assert [r["participant_id"] for r in read_tsv(tmp_path / "study" / "dicom_uids.tsv")] == ["sub-02"]

    # The config's rule decides: leave STIR out, and the same study converts.
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"imaging_dir": str(tmp_path / "study" / "imaging"),
                                      "dicom_series_rule": {"exclude": "stir"}}))
    assert run_import(tmp_path, "--config", config) == 0
    assert t2_path(tmp_path, "01", "baseline").is_file()


def test_unmatched_study_and_two_studies_for_one_session_are_reported(tmp_path, phantom, capsys):
    s1, s2 = StudyInfo("one", study_date="20240110"), StudyInfo("two", study_date="20240110", accession_number="X2")
    stray = StudyInfo("stray", study_date="20240501", accession_number="X3")
    for study in (s1, s2, stray):
        write_study(tmp_path / "dicom" / study.key, phantom, study)
    visits = tmp_path / "visits.tsv"
    visits.write_text("participant_id\tsession_id\tpatient_id\tstudy_date\n01\tbaseline\tPATQX4711\t2024-01-10\n")
    assert run_import(tmp_path) == 1
    out = capsys.readouterr().out
    assert "fits no row of the visits table" in out
    both = [line for line in out.splitlines() if "two or more studies for sub-01 ses-baseline" in line]
    assert len(both) == 2 and s1.study_instance_uid in both[1] and s2.study_instance_uid in both[0], out
    assert not (tmp_path / "study" / "imaging" / "sub-01").exists()
    assert {r["study_status"] for r in report_rows(tmp_path)} == {"failed"}


def test_month_window(tmp_path, phantom, capsys):
    studies = [StudyInfo("w0", study_date="20240212"), StudyInfo("w6", study_date="20240820", accession_number="A6"),
               StudyInfo("w3", study_date="20240515", accession_number="A3")]
    for study in studies:
        write_study(tmp_path / "dicom" / study.key, phantom, study)
    visits = tmp_path / "visits.tsv"
    visits.write_text("participant_id\tpatient_id\n01\tPATQX4711\n")
    assert run_import(tmp_path, "--month-window", "1.5") == 1
    out = capsys.readouterr().out
    assert t2_path(tmp_path, "01", "baseline").is_file() and t2_path(tmp_path, "01", "m06").is_file()
    assert "3.1 months after sub-01's first study, within 1.5 months of no session" in out


FAULTS = [
    ({"drop_slices": (6,)}, "missing slices"),
    ({"move_slices_mm": {6: 0.6}}, "varying slice spacing"),
    ({"shift_in_plane_mm_per_slice": 0.8}, "gantry tilt"),
    ({"other_orientation_slices": (4,)}, "mixed series"),
]


@pytest.mark.parametrize("enhanced", [False, True], ids=["single-frame", "enhanced multi-frame"])
@pytest.mark.parametrize("faults, words", FAULTS, ids=[w for _, w in FAULTS])
def test_series_problems_are_reported_and_the_rest_converts(tmp_path, phantom, faults, words, enhanced, capsys):
    bad, good = StudyInfo("bad"), StudyInfo("good", study_date="20240303", accession_number="G1")
    write_study(tmp_path / "dicom" / "bad", phantom, bad, enhanced=enhanced, **faults)
    write_study(tmp_path / "dicom" / "good", phantom, good, enhanced=not enhanced)
    visits_by_uid(tmp_path / "visits.tsv", [("01", "baseline", bad), ("02", "baseline", good)])
    assert run_import(tmp_path) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("sub-01 ses-baseline"))
    assert "failed" in line and words in line, line
    assert not t2_path(tmp_path, "01", "baseline").exists()
    assert t2_path(tmp_path, "02", "baseline").is_file()


def test_no_t2_series(tmp_path, phantom, capsys):
    study = StudyInfo("t1only")
    write_study(tmp_path / "dicom", phantom, study, T1)
    visits_by_uid(tmp_path / "visits.tsv", [("01", "baseline", study)])
    assert run_import(tmp_path) == 1
    assert "no T2 series found (series 2 't1_tse_tra'" in capsys.readouterr().out


def test_uid_map_inside_imaging_dir_is_refused(tmp_path, phantom, capsys):
    study = StudyInfo("u")
    write_study(tmp_path / "dicom", phantom, study)
    visits_by_uid(tmp_path / "visits.tsv", [("01", "baseline", study)])
    assert run_import(tmp_path, "--uid-map", tmp_path / "study" / "imaging" / "uids.tsv") == 2
    assert "outside the imaging folder" in capsys.readouterr().err
    assert not (tmp_path / "study" / "imaging").exists()


def test_leak_scan_of_the_files_about_to_be_written():
    """The import's last guard, with the leak audit's matching: any identifier or date in the NIfTI or the sidecar."""
    import nibabel as nib

    from khe_vol.dicom.importer import deidentified_payloads, leaks

    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    img = nib.Nifti1Image.from_bytes(img.to_bytes())  # as the import holds dcm2niix's file
    identifying = identifying_strings([StudyInfo("leak")], [T2])
    nifti, side = deidentified_payloads(img, {"EchoTime": 0.092, "InstitutionName": PATIENT["InstitutionName"],
                                              "AcquisitionDateTime": "2024-02-12T10:15:00"})
    assert leaks({"T2w.nii.gz": nifti, "T2w.json": side}, identifying) == []  # filtered and blanked
    img.header["descrip"] = b"Quixote TE=92"
    raw = gzip.compress(img.to_bytes(), mtime=0)
    assert any("Quixote" in line for line in leaks({"T2w.nii.gz": raw}, identifying))
    for text in (f'{{"InstitutionName": "{PATIENT["InstitutionName"]}"}}', '{"AcquisitionDateTime": "2024-02-12"}',
                 f'{{"Note": "{StudyInfo("leak").study_instance_uid}"}}'):
        assert leaks({"T2w.json": text.encode()}, identifying), text


def test_dicom_demo_is_the_readme_worked_example(tmp_path, monkeypatch, capsys):
    """`khe-vol demo DIR --dicom` then the README's commands, from DIR: every study converts, check is clean."""
    demo = tmp_path / "dicom_demo"
    assert main(["demo", str(demo), "--dicom"]) == 0
    first = {p: p.read_bytes() for p in demo.rglob("*") if p.is_file()}
    assert main(["demo", str(demo), "--dicom"]) == 0
    assert {p: p.read_bytes() for p in demo.rglob("*") if p.is_file()} == first  # the same bytes
    monkeypatch.chdir(demo)
    assert main(["import", "site_export/", "--out", "study/imaging", "--visits", "visits.tsv",
                 "--config", "study.yaml"]) == 0, capsys.readouterr().out
    assert "4 of 4 studies converted" in capsys.readouterr().out
    assert main(["check", "study.yaml"]) == 0
    rows = read_tsv(demo / "study" / "dicom_uids.tsv")
    assert [(r["participant_id"], r["session_id"]) for r in rows] == [
        ("sub-01", "ses-baseline"), ("sub-01", "ses-m06"), ("sub-02", "ses-baseline"), ("sub-02", "ses-m06")]
    assert [len(json.loads(r["dicom_files"])) for r in rows] == [20, 20, 1, 1]  # single-frame; enhanced
