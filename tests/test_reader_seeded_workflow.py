"""A baseline with no seed, seeded by one reader in the reader app, feeds the next run (real Snakemake runs).

sub-01 has a seed in the seeds table; sub-02 has none. First run: sub-02's
baseline is a ``needs_seed`` case in every reader's package and its follow-up
is not tracked. Then R1 seeds it as a reader does (a click in bright lesion
tissue, the mask computed from the package image by the click engine) and
the rerun tracks sub-02's follow-up from R1's baseline, for R1 only.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from khe_vol.files import read_tsv
from khe_vol.nifti import mask_image, nifti_bytes
from khe_vol.qa import store
from khe_vol.qa.store import record_read
from khe_vol.segmentation.interactive import Click, clicks_from_json, segment_clicks
from khe_vol.synthetic.seeds import reader_seeds_ras_mm
from tests.conftest import make_affine, save_nifti
from tests.test_workflow import run_snakemake

pytestmark = pytest.mark.slow

READERS = ["R1", "R2"]
SHAPE = (48, 48, 16)
# Lesion radius per session (mm): -58 % at m06 for both participants.
RADII_MM = {"baseline": 12.0, "m06": 9.0}


def ball_scene(shape, affine, centre_ras_mm, radius_mm, rng):
    """A bright ball in tissue with structure fixed in world space (so follow-ups register), and its mask."""
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    inside = (np.linalg.norm(xyz - centre_ras_mm, axis=1) < radius_mm).reshape(shape)
    x, y, z = xyz.T
    tissue = (100 + 35 * np.sin(x / 5.0) * np.cos(y / 7.0) + 25 * np.cos(z / 6.0 + x / 11.0)).reshape(shape)
    image = np.where(inside, 300.0, tissue) + rng.normal(0, 5, shape)
    return image.astype(np.float32), inside.astype(np.uint8)


def write_cohort(root):
    """Two participants, baseline + m06; only sub-01 has a seed. Returns the config path and truth masks."""
    rng = np.random.default_rng(11)
    truth = {}
    for pid, centre in (("01", np.array([2.0, -1.0, 0.0])), ("02", np.array([-3.0, 2.0, 3.0]))):
        for ses, radius in RADII_MM.items():
            aff = make_affine((1.0, 1.0, 3.0), (-24, -24, -24))
            image, mask = ball_scene(SHAPE, aff, centre, radius, rng)
            save_nifti(root / "imaging" / f"sub-{pid}/ses-{ses}/anat/sub-{pid}_ses-{ses}_T2w.nii.gz", image, aff)
            truth[(f"sub-{pid}", f"ses-{ses}")] = (mask, aff)
    mask, aff = truth[("sub-01", "ses-baseline")]
    seed = reader_seeds_ras_mm(mask, aff, np.random.default_rng(5))[0]
    (root / "seeds.tsv").write_text("participant_id\tx\ty\tz\n" + "sub-01\t" + "\t".join(f"{v:.2f}" for v in seed) + "\n")
    config = {
        "imaging_dir": str(root / "imaging"),
        "seeds": str(root / "seeds.tsv"),
        "results_dir": str(root / "results"),
        "sessions": {"baseline": 0, "m06": 6},
        "readers": READERS,
        "qa_seed": 4410923377712,
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, truth


def _key(results):
    return {(r["reader"], r["participant_id"], r["session_id"]): r for r in read_tsv(results / "blinding/key.tsv")}


def _worklist(results, reader):
    return json.loads((results / "qa" / reader / "worklist.json").read_text())


def _rows(path):
    return {(r["participant_id"], r["session_id"]): r for r in read_tsv(path)}


def _outputs(results):
    return {p: p.read_bytes() for p in sorted(results.rglob("*")) if p.is_file()
            and not {"logs", "benchmarks"} & set(p.parts) and p.suffix not in (".sqlite", ".lock")
            and not p.name.endswith(("-wal", "-shm"))}


def seed_in_browser(results, code, targets, tmp):
    """R1 opens a case in the reader app in Chromium, clicks ``targets`` (kind, RAS mm) and accepts."""
    from tests.test_qa_app import reader_browser, wait_status
    from tests.test_qa_clicks import click_at

    with reader_browser(results, tmp) as served:
        page, base, errors = served.page, served.base, served.errors
        page.goto(f"{base}/case/{code}")
        page.wait_for_selector("body[data-ready='1']", timeout=30000)
        assert "click inside the lesion" in page.inner_text("#seed-prompt")
        page.click("button[data-slice='0']")  # axial
        for n, (kind, mm) in enumerate(targets, start=1):
            click_at(page, mm, shift=kind == "exclude")
            page.wait_for_function("(n) => window.khe.clicks.length === n && !window.khe.busy", arg=n,
                                   timeout=30000)
            assert page.inner_text("#error") == ""
        page.click("button.verdict[data-verdict='accept']")
        wait_status(page, "Current: Edited (revision 1)")
    assert not errors, errors


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader_seeded")
    config, truth = write_cohort(root)
    run_snakemake(root / "work", config)
    return root, config, truth, root / "results"


def test_unseeded_baseline_waits_for_every_readers_seed(seeded_run):
    root, _, _, results = seeded_run
    key = _key(results)
    for reader in READERS:
        cases = {c["case_code"]: c for c in _worklist(results, reader)["cases"]}
        base = cases[key[(reader, "sub-02", "ses-baseline")]["case_code"]]
        assert base["needs_seed"] is True and base["proposed_mask"] is None
        seeded = cases[key[(reader, "sub-01", "ses-baseline")]["case_code"]]
        assert seeded["needs_seed"] is False and seeded["proposed_mask"]
        assert all(c["needs_seed"] is False for code, c in cases.items() if code != base["case_code"])
        # Nothing to track sub-02's follow-up from: no case for it yet.
        assert key[(reader, "sub-02", "ses-m06")]["status"] == "no_case"
        assert len(cases) == 3
    volumes = _rows(results / "volumes.tsv")
    for ses in ("ses-baseline", "ses-m06"):
        row = volumes[("sub-02", ses)]
        assert row["qa_status"] == "pending_seed" and row["volume_ml"] == "n/a" and row["status"] == "pending"
        assert "seed" in row["message"] and row["seed_source"] == "n/a"
        assert row["volume_auto_ml"] == "n/a"  # never a silent 0 mL
    assert volumes[("sub-01", "ses-baseline")]["seed_source"] == "seeds_file"
    assert volumes[("sub-01", "ses-m06")]["seed_source"] == "tracked"
    response = _rows(results / "response.tsv")
    assert response[("sub-02", "ses-m06")]["category"] == "n/a"
    assert response[("sub-01", "ses-m06")]["baseline_seed_source"] == "seeds_file"
    assert (results / "blinding/audit.txt").read_text().startswith("clean")


def test_one_readers_seed_feeds_only_that_readers_follow_ups(seeded_run):
    root, config, truth, results = seeded_run
    key = _key(results)
    row = key[("R1", "sub-02", "ses-baseline")]
    image_path = results / "qa/R1" / f"{row['case_code']}_t2.nii.gz"
    img = nib.load(image_path)
    image, affine = np.asarray(img.dataobj, dtype=np.float32), img.affine
    # R1 seeds the case in the real reader app, in Chromium: a click in bright lesion tissue
    # (>= 3 mm inside, not the deepest point), an include elsewhere in it, an exclude in the
    # tissue beside it; then accepts.
    truth_mask, truth_affine = truth[("sub-02", "ses-baseline")]
    assert np.allclose(truth_affine, affine)
    seed, inside = reader_seeds_ras_mm(truth_mask, affine, np.random.default_rng(21), n_seeds=2)
    centre = np.array([-3.0, 2.0, 3.0])
    outside = centre + (np.asarray(seed) - centre) / np.linalg.norm(np.asarray(seed) - centre) * (RADII_MM["baseline"] + 4)
    targets = [("include", seed), ("include", inside), ("exclude", outside)]
    seed_in_browser(results, row["case_code"], targets, root)
    (read,) = [r for r in store.current_reads(results / "reads/R1.sqlite") if r["case_code"] == row["case_code"]]
    assert [c["kind"] for c in read["clicks"]] == ["include", "include", "exclude"]
    clicks = clicks_from_json(read["clicks"])
    mask, info = segment_clicks(image, affine, clicks)
    saved = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(read["edited_mask"])).dataobj)
    assert np.array_equal(saved, mask) and info["volume_ml"] > 0
    run_snakemake(root / "work", config)

    key = _key(results)
    r1 = key[("R1", "sub-02", "ses-m06")]
    assert r1["status"] == "case" and r1["has_proposed_mask"] == "yes"
    assert "readers/R1" in r1["record_path"]
    assert key[("R2", "sub-02", "ses-m06")]["status"] == "no_case"
    cases = {c["case_code"]: c for c in _worklist(results, "R1")["cases"]}
    assert len(cases) == 4 and cases[r1["case_code"]]["needs_seed"] is False
    # The baseline case stays as R1 read it (no proposed mask), so the read is not stale.
    assert cases[row["case_code"]]["needs_seed"] is True
    assert len(_worklist(results, "R2")["cases"]) == 3
    # R1's follow-up is tracked from R1's baseline: a partial involution, as the truth's -58 %.
    own = json.loads(Path(r1["record_path"]).read_text())
    base = json.loads((results / "work/readers/R1/baseline/sub-02/record.json").read_text())
    assert base["seed_source"] == "reader" and own["reference_session_id"] == "ses-baseline"
    assert own["status"] == "ok"
    assert 0.25 < own["volume_ml"] / base["volume_ml"] < 0.75
    assert base["seed_ras_mm"] == pytest.approx(list(clicks[0].ras_mm))  # the seed the reader clicked
    # R2 sees nothing of R1's: no file of R2's package changed, no mention in R2's worklist.
    assert r1["case_code"] not in (results / "qa/R2/worklist.json").read_text()

    volumes = _rows(results / "volumes.tsv")
    baseline = volumes[("sub-02", "ses-baseline")]
    assert baseline["qa_status"] == "pending_seed" and "R2" in baseline["message"]
    assert volumes[("sub-02", "ses-m06")]["qa_status"] == "pending_seed"

    # R2 seeds too (elsewhere in the lesion) and both accept the rest: final values appear.
    click2 = reader_seeds_ras_mm(truth_mask, affine, np.random.default_rng(99))[0]
    row2 = key[("R2", "sub-02", "ses-baseline")]
    img2 = nib.load(results / "qa/R2" / f"{row2['case_code']}_t2.nii.gz")
    mask2, info2 = segment_clicks(np.asarray(img2.dataobj, np.float32), img2.affine,
                                  [Click("include", tuple(float(v) for v in click2))])
    record_read(results / "reads/R2.sqlite", "R2", row2["case_code"], "edited",
                edited_mask=nifti_bytes(mask_image(mask2, img2.affine)), edited_volume_ml=info2["volume_ml"])
    run_snakemake(root / "work", config)
    key = _key(results)
    assert key[("R2", "sub-02", "ses-m06")]["status"] == "case"
    assert "readers/R2" in key[("R2", "sub-02", "ses-m06")]["record_path"]
    for (reader, pid, ses), r in key.items():
        if r["status"] == "case" and ses != "ses-baseline" or pid == "sub-01":
            sha = None if r["proposed_mask_sha256"] == "n/a" else r["proposed_mask_sha256"]
            record_read(results / f"reads/{reader}.sqlite", reader, r["case_code"], "accept",
                        proposed_mask_sha256=sha)
    run_snakemake(root / "work", config)
    volumes = _rows(results / "volumes.tsv")
    baseline = volumes[("sub-02", "ses-baseline")]
    assert baseline["qa_status"] == "edited" and baseline["seed_source"] == "reader"
    assert baseline["volume_source"] == "R1:edited"
    follow = volumes[("sub-02", "ses-m06")]
    assert follow["qa_status"] == "accepted" and follow["volume_source"] == "R1:accept"
    assert float(follow["volume_ml"]) == pytest.approx(own["volume_ml"], abs=1e-6)
    response = _rows(results / "response.tsv")[("sub-02", "ses-m06")]
    assert response["category"] == "partial_involution" and response["baseline_seed_source"] == "reader"

    # Rerun-stable: nothing to do, and the same bytes.
    first = _outputs(results)
    proc = run_snakemake(root / "work", config)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert _outputs(results) == first


def test_a_broken_read_is_a_clear_message_and_the_tables_are_still_written(tmp_path):
    root = tmp_path
    config, _ = write_cohort(root)
    results = root / "results"
    run_snakemake(root / "work", config)
    row = _key(results)[("R1", "sub-02", "ses-baseline")]
    # A mask on another grid than the case (a reader's file from elsewhere).
    wrong = mask_image(np.ones((4, 4, 4), np.uint8), np.eye(4))
    record_read(results / "reads/R1.sqlite", "R1", row["case_code"], "edited", edited_mask=nifti_bytes(wrong))
    proc = run_snakemake(root / "work", config)
    log = proc.stdout + proc.stderr
    assert "R1.sqlite" in log and "cannot seed the follow-ups" in log
    volumes = _rows(results / "volumes.tsv")
    assert volumes[("sub-02", "ses-baseline")]["qa_status"] in ("pending_seed", "pending_read")
    assert volumes[("sub-01", "ses-baseline")]["seed_source"] == "seeds_file"
    assert _key(results)[("R1", "sub-02", "ses-m06")]["status"] == "no_case"
