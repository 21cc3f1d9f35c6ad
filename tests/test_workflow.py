"""Real Snakemake runs of the repository's Snakefile on tiny cohorts."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from khe_vol.synthetic.dicom import SeriesInfo, StudyInfo, small_phantom, stored_values, write_single_frame_series
from tests.cohort import add_seed_on_fluid, write_mask_cohort
from tests.conftest import make_affine, save_nifti

# End to end: `pytest -m "not slow"` leaves these out.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def run_snakemake(workdir, configfile, *extra, check=True):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "--configfile", str(configfile), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_tsv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def add_bad_series(root):
    """Participants whose series are broken in each way a site can break them."""
    img = Path(root) / "imaging"
    good = next(img.glob("sub-01/ses-baseline/anat/*_T2w.nii.gz"))
    aff = make_affine((1, 1, 3), (0, 0, 0))
    bad = {}
    p = img / "sub-90/ses-baseline/anat/sub-90_ses-baseline_T2w.nii.gz"
    p.parent.mkdir(parents=True)
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    bad[("sub-90", "ses-baseline")] = "truncated"
    p = img / "sub-91/ses-baseline/anat/sub-91_ses-baseline_T2w.nii.gz"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"")
    bad[("sub-91", "ses-baseline")] = "empty"
    save_nifti(img / "sub-92/ses-baseline/anat/sub-92_ses-baseline_T2w.nii.gz", np.ones((8, 8, 4, 3), np.float32), aff)
    bad[("sub-92", "ses-baseline")] = "3 volumes"
    nan = np.ones((8, 8, 4), np.float32)
    nan[0, 0, 0] = np.nan
    save_nifti(img / "sub-93/ses-baseline/anat/sub-93_ses-baseline_T2w.nii.gz", nan, aff)
    bad[("sub-93", "ses-baseline")] = "NaN"
    p = img / "sub-94/ses-baseline/anat/sub-94_ses-baseline_T2w.nii"
    p.parent.mkdir(parents=True)
    p.write_text("not an image\n" * 40)
    bad[("sub-94", "ses-baseline")] = "not a readable NIfTI"
    sing = make_affine((1, 1, 3), (0, 0, 0))
    sing[:3, 1] = sing[:3, 0]
    save_nifti(img / "sub-95/ses-baseline/anat/sub-95_ses-baseline_T2w.nii.gz",
               np.random.default_rng(0).random((8, 8, 4)).astype(np.float32), sing, qform_code=0)
    bad[("sub-95", "ses-baseline")] = "singular"
    # a follow-up whose participant has no baseline, and an unknown session label
    src = next(img.glob("sub-01/ses-m06/anat/*_T2w.nii.gz"))
    p = img / "sub-96/ses-m06/anat/sub-96_ses-m06_T2w.nii.gz"
    p.parent.mkdir(parents=True)
    p.write_bytes(src.read_bytes())
    bad[("sub-96", "ses-m06")] = "no seed and no reader mask"
    p = img / "sub-01/ses-m03/anat/sub-01_ses-m03_T2w.nii.gz"
    p.parent.mkdir(parents=True)
    p.write_bytes(src.read_bytes())
    bad[("sub-01", "ses-m03")] = "not in the config sessions"
    # a reader mask far away from its series
    mask = Path(root) / "masks/sub-97/ses-baseline/anat/sub-97_ses-baseline_label-lesion_mask.nii.gz"
    save_nifti(mask, np.ones((4, 4, 4), np.uint8), make_affine((1, 1, 1), (900, 900, 900)))
    p = img / "sub-97/ses-baseline/anat/sub-97_ses-baseline_T2w.nii.gz"
    p.parent.mkdir(parents=True)
    p.write_bytes(good.read_bytes())
    bad[("sub-97", "ses-baseline")] = "does not overlap"
    # DICOM slices copied by hand under a NIfTI name, gzip-style and plain
    ph = small_phantom(rng_seed=3, shape=(16, 16, 6))
    stored, slope, intercept = stored_values(ph.image)
    slices = sorted(write_single_frame_series(Path(root) / "site_dicom", stored, ph.affine, slope, intercept,
                                              StudyInfo("hand"), SeriesInfo()))
    for pid, name in (("sub-88", "sub-88_ses-baseline_T2w.nii.gz"), ("sub-89", "sub-89_ses-baseline_T2w.nii")):
        p = img / pid / "ses-baseline/anat" / name
        p.parent.mkdir(parents=True)
        p.write_bytes(Path(slices[0]).read_bytes())
        bad[(pid, "ses-baseline")] = "this is a DICOM file, not NIfTI"
    shutil.rmtree(Path(root) / "site_dicom")
    return bad


def add_missing_baseline(root):
    """sub-98 has a measurable m06 (reader mask) but no baseline series at all."""
    img = Path(root) / "imaging"
    for kind, pattern in (("imaging", "sub-01/ses-m06/anat/*_T2w.nii.gz"), ("masks", "sub-01/ses-m06/anat/*_mask.nii.gz")):
        src = next((Path(root) / kind).glob(pattern))
        dst = Path(root) / kind / "sub-98/ses-m06/anat" / src.name.replace("sub-01", "sub-98")
        dst.parent.mkdir(parents=True)
        dst.write_bytes(src.read_bytes())
    return img


@pytest.fixture(scope="module")
def mask_cohort_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("maskcohort")
    config = write_mask_cohort(root)
    bad = add_bad_series(root)
    add_missing_baseline(root)
    add_seed_on_fluid(root)
    inputs_before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    proc = run_snakemake(root / "work", config)
    return root, config, bad, inputs_before, proc


def test_every_series_gets_a_row_and_bad_ones_say_why(mask_cohort_run):
    root, _, bad, _, proc = mask_cohort_run
    rows = {(r["participant_id"], r["session_id"]): r for r in read_tsv(root / "results/volumes.tsv")}
    # + sub-98's m06, sub-99's two series, and three missing visits (the baselines of sub-96, sub-98; sub-99's m06)
    assert len(rows) == 6 + len(bad) + 1 + 2 + 3
    assert rows[("sub-98", "ses-m06")]["status"] == "ok"
    for key, words in bad.items():
        assert rows[key]["status"] == "error", key
        assert words in rows[key]["message"], (key, rows[key]["message"])
        assert rows[key]["volume_ml"] == "n/a"
    for pid in ("sub-01", "sub-02"):
        assert rows[(pid, "ses-baseline")]["status"] == "ok"
        assert rows[(pid, "ses-baseline")]["method"] == "reader_mask"
    # the file is named in each image error
    assert "sub-90_ses-baseline_T2w.nii.gz" in rows[("sub-90", "ses-baseline")]["message"]
    assert f"khe-vol: {9 + len(bad)} series, {len(bad)} with errors, 3 expected visit(s) missing" in proc.stdout + proc.stderr


def test_missing_visits_are_rows_in_the_tables_and_check(mask_cohort_run):
    """Issue 25: an expected visit with no series (a config session before the participant's last) is a
    status=missing row in volumes.tsv (and response.tsv for a follow-up), a row in check.tsv, and the summary
    names it; a participant's sessions after their last one are not expected."""
    root, config, _, _, proc = mask_cohort_run
    volumes = {(r["participant_id"], r["session_id"]): r for r in read_tsv(root / "results/volumes.tsv")}
    response = {(r["participant_id"], r["session_id"]): r for r in read_tsv(root / "results/response.tsv")}
    missing = {key for key, r in volumes.items() if r["status"] == "missing"}
    assert missing == {("sub-96", "ses-baseline"), ("sub-98", "ses-baseline"), ("sub-99", "ses-m06")}
    assert {key for key, r in response.items() if r["status"] == "missing"} == {("sub-99", "ses-m06")}
    row = volumes[("sub-99", "ses-m06")]
    assert row["month"] == "6" and row["needs_review"] == "0" and "ses-m12" in row["message"], row
    assert "follow-up visit missing" in response[("sub-99", "ses-m06")]["message"]
    assert [k[1] for k in volumes if k[0] == "sub-99"] == ["ses-baseline", "ses-m06", "ses-m12"]
    check = read_tsv(root / "results/check.tsv")
    assert [r["session_id"] for r in check if r["participant_id"] == "sub-99"] == ["ses-m06"], check
    out = proc.stdout + proc.stderr
    assert ("MISSING: 3 expected visit(s) with no series (sub-96 ses-baseline, sub-98 ses-baseline, "
            "sub-99 ses-m06)") in out, out[-3000:]
    # `khe-vol check`, as a coordinator runs it before the run, says the same
    proc = subprocess.run([sys.executable, "-m", "khe_vol.cli", "check", str(config), "--headers-only"],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 1
    assert "sub-99\tses-m06\tno T2w series for sub-99 ses-m06 (month 6): an expected visit" in proc.stdout


def test_a_seed_on_a_fluid_collection_is_called_one(mask_cohort_run):
    """Issue 25: sub-99's seed lies on a fluid collection 19 mm from the lesion; the collection is segmented.
    Its baseline says seed_on_fluid, and so does the follow-up tracked from it, and the category asks for review."""
    root, *_ = mask_cohort_run
    volumes = {(r["participant_id"], r["session_id"]): r for r in read_tsv(root / "results/volumes.tsv")}
    for ses in ("ses-baseline", "ses-m12"):
        row = volumes[("sub-99", ses)]
        assert row["status"] == "ok" and row["needs_review"] == "1", row
        assert "seed_on_fluid" in row["review_reason"].split(";"), row
    assert float(volumes[("sub-99", "ses-baseline")]["volume_ml"]) < 15  # the collection, not the 60 mL lesion
    (row,) = [r for r in read_tsv(root / "results/response.tsv") if r["participant_id"] == "sub-99" and r["status"] == "ok"]
    assert row["needs_review"] == "1" and {"seed_on_fluid", "baseline_needs_review"} <= set(row["review_reason"].split(";"))


def test_the_summary_says_what_needs_review_and_why(mask_cohort_run):
    """Issue 25: the end-of-run summary counts the series and categories that need review, per reason."""
    root, *_, proc = mask_cohort_run
    out = proc.stdout + proc.stderr
    volumes, response = (read_tsv(root / f"results/{t}.tsv") for t in ("volumes", "response"))
    n_series = sum(r["needs_review"] == "1" for r in volumes)
    n_categories = sum(r["needs_review"] == "1" for r in response)
    assert n_series >= 2 and n_categories >= 1
    (line,) = [line for line in out.splitlines() if "NEEDS REVIEW" in line]
    series, categories = line.split("; ", 1)
    n_found = sum(r["status"] != "missing" for r in volumes)
    assert f"{n_series} of {n_found} series (" in series and "seed_on_fluid 2" in series, line
    classified = sum(r["status"] == "ok" for r in response)
    assert f"{n_categories} of {classified} category(ies) (" in categories and "seed_on_fluid 1" in categories, line


def test_response_table_and_categories(mask_cohort_run):
    root = mask_cohort_run[0]
    rows = {(r["participant_id"], r["session_id"]): r for r in read_tsv(root / "results/response.tsv")}
    for pid in ("sub-01", "sub-02"):
        assert rows[(pid, "ses-m06")]["category"] == "partial_involution"
        assert rows[(pid, "ses-m06")]["overall_response"] == "1" and rows[(pid, "ses-m06")]["good_response"] == "0"
        assert rows[(pid, "ses-m12")]["category"] == "complete_involution"
        assert rows[(pid, "ses-m12")]["percent_change"] == "-100.000"
    assert rows[("sub-96", "ses-m06")]["status"] == "error"
    missing = rows[("sub-98", "ses-m06")]
    assert missing["status"] == "error" and missing["volume_ml"] != "n/a"
    assert "no baseline series (ses-baseline) for sub-98" in missing["message"]
    assert "ses-m03" in rows[("sub-01", "ses-m03")]["message"]
    # flipped/permuted reader masks measure like the plain ones (same balls, 1 voxel noise)
    v1 = float(rows[("sub-01", "ses-m06")]["volume_ml"])
    v2 = float(rows[("sub-02", "ses-m06")]["volume_ml"])
    assert v2 == pytest.approx(v1, rel=0.05)


def test_dictionaries_and_derivatives(mask_cohort_run):
    import json

    import nibabel as nib

    root = mask_cohort_run[0]
    res = root / "results"
    for table in ("volumes", "response"):
        header = (res / f"{table}.tsv").read_text().splitlines()[0].split("\t")
        dictionary = json.loads((res / f"{table}.json").read_text())
        provenance = dictionary.pop("Provenance")
        software = dictionary.pop("GeneratedBy")
        assert list(dictionary) == header
        assert all("Description" in v for v in dictionary.values())
        assert software["khe_vol"] and software["nibabel"] and software["SimpleITK"] and software["snakemake"]
        assert {i["source_sha256"] for i in provenance["Inputs"] if i["status"] == "ok"} <= {
            r["source_sha256"] for r in (json.loads(p.read_text()) for p in (res / "work/series").rglob("record.json"))}
        assert provenance["Config"]["results_dir"] == str(res)
    desc = json.loads((res / "derivatives/dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "khe-vol"
    for r in read_tsv(res / "volumes.tsv"):
        mask = res / "derivatives" / r["participant_id"] / r["session_id"] / "anat" / f"{r['participant_id']}_{r['session_id']}_label-lesion_mask.nii.gz"
        assert mask.exists() == (r["status"] == "ok")
        if r["status"] == "ok":
            img = nib.load(mask)
            src = nib.load(json.loads(mask.with_name(mask.name.replace(".nii.gz", ".json")).read_text())["SourceFile"])
            assert img.shape == src.shape[:3] and np.allclose(img.affine, src.affine)
            assert img.get_data_dtype() == np.uint8
            assert int(np.asarray(img.dataobj).sum()) == int(r["n_voxels"])
    check = read_tsv(res / "check.tsv")
    assert {"sub-92", "sub-95", "sub-98"} <= {c["participant_id"] for c in check}
    assert list(json.loads((res / "check.json").read_text())) == ["participant_id", "session_id", "problem", "severity"]


def test_inputs_untouched_and_rerun_is_byte_identical(mask_cohort_run, tmp_path):
    root, config, _, inputs_before, _ = mask_cohort_run
    for p, payload in inputs_before.items():
        assert p.read_bytes() == payload, p
    res = root / "results"
    outputs = sorted(p for p in res.rglob("*") if p.is_file() and "logs" not in p.parts
                     and "benchmarks" not in p.parts and p.name != ".snakemake_timestamp")
    first = {p: p.read_bytes() for p in outputs}
    proc = run_snakemake(root / "work", config)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    # a fresh run elsewhere gives the same bytes
    cfg = yaml.safe_load(Path(config).read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    other = tmp_path / "config.yaml"
    other.write_text(yaml.safe_dump(cfg))
    run_snakemake(tmp_path / "work", other, "--cores", "1")
    for p, payload in first.items():
        again = (tmp_path / "results" / p.relative_to(res)).read_bytes()
        # Provenance names the results folder itself (config, output paths): the one allowed difference.
        assert again.replace(str(tmp_path / "results").encode(), b"<R>") == payload.replace(str(res).encode(), b"<R>"), p


def test_lint_is_clean(mask_cohort_run):
    root, config, *_ = mask_cohort_run
    proc = run_snakemake(root / "lint", config, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_bad_config_is_a_clear_error(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"imaging_dir": str(tmp_path), "sessionz": {"a": 0}}))
    proc = run_snakemake(tmp_path / "work", cfg, check=False)
    assert proc.returncode != 0
    assert "sessionz" in proc.stdout + proc.stderr


def test_participant_pages_name_the_participant_embed_their_images_and_stay_out_of_qa(mask_cohort_run):
    import base64
    import io

    import matplotlib.image as mpimg

    root = mask_cohort_run[0]
    res = root / "results"
    volumes = read_tsv(res / "volumes.tsv")
    participants = sorted({r["participant_id"] for r in volumes})
    assert sorted(p.name for p in (res / "participants").iterdir()) == sorted(
        f"{pid}.{ext}" for pid in participants for ext in ("html", "pdf"))
    page = (res / "participants" / "sub-01.html").read_text()
    assert "<h1>sub-01</h1>" in page and "sub-02" not in page
    for ses in ("ses-baseline", "ses-m06", "ses-m12"):
        assert ses in page
    assert "partial_involution" in page and "complete_involution" in page
    # Self-contained: every image is an embedded PNG, nothing is fetched.
    sources = page.split('src="')[1:]
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    for s in sources:
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(s.split('"')[0].split(",", 1)[1])), format="png")
        assert pixels.shape[0] > 100
    assert (res / "participants" / "sub-01.pdf").read_bytes().startswith(b"%PDF")
    # An unreadable series says so on its participant's page instead of failing the run.
    broken = (res / "participants" / "sub-90.html").read_text()
    assert "No image of this participant could be read." in broken
    assert "<li>ses-baseline: no image: " in broken and "truncated" in broken
