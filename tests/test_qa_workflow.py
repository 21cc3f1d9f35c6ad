"""Blinded reading through real Snakemake runs: packages, audit, reads back, adjudication."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from khe_vol.nifti import load_image, mask_image, nifti_bytes
from khe_vol.files import read_tsv
from khe_vol.qa.store import record_read
from tests.cohort import write_mask_cohort
from tests.test_workflow import read_tsv as read_table
from tests.test_workflow import run_snakemake

# End to end: `pytest -m "not slow"` leaves these out.
pytestmark = pytest.mark.slow

READERS = ["R1", "R2"]


def _key(results, name="key.tsv"):
    return {(r["reader"], r["participant_id"], r["session_id"]): r for r in read_tsv(results / "blinding" / name)}


def _read_all(results, key, verdicts=None):
    """Every reader's read of every case of ``key`` (accept unless ``verdicts`` says otherwise)."""
    verdicts = verdicts or {}
    for (reader, pid, ses), row in sorted(key.items()):
        if row["status"] != "case":
            continue
        verdict, mask = verdicts.get((reader, pid, ses), ("accept", None))
        sha = None if row["proposed_mask_sha256"] == "n/a" else row["proposed_mask_sha256"]
        extra = {}
        if mask is not None:
            extra = {"edited_mask": nifti_bytes(mask), "edited_volume_ml": None}
        record_read(results / "reads" / f"{reader}.sqlite", reader, row["case_code"], verdict,
                    proposed_mask_sha256=sha, **extra)


def _all_bytes(folder):
    """Every file's bytes under a folder, gzip files decompressed."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            yield path, gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


@pytest.fixture(scope="module")
def qa_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa_cohort")
    config_path = write_mask_cohort(root)
    # A site's header text naming the participant, session and date: must not reach readers.
    src = root / "imaging/sub-01/ses-baseline/anat/sub-01_ses-baseline_T2w.nii.gz"
    img = nib.load(src)
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
    img.header["descrip"] = b"sub-01 baseline 2025-03-14"
    nib.save(img, src)
    config = yaml.safe_load(config_path.read_text())
    config.update(readers=READERS, adjudicator="ADJ", qa_seed=8817230998812345)
    config_path.write_text(yaml.safe_dump(config))
    # A shared study folder's usual umask: results readable by the group and others.
    umask = os.umask(0o022)
    try:
        proc = run_snakemake(root / "work", config_path)
    finally:
        os.umask(umask)
    (root / "first_run.log").write_text(proc.stdout + proc.stderr)
    return root, config_path, root / "results"


def test_results_follow_the_umask_and_secrets_stay_private(qa_cohort):
    """Under umask 022 every result is 0644 (others of the study read the tables), the blinding key 0600."""
    _, _, results = qa_cohort
    modes = {path.relative_to(results).as_posix(): path.stat().st_mode & 0o777
             for path in results.rglob("*") if path.is_file()}
    # the unblinding key, and the arm and site names the comment check and the audit share
    secrets = {name for name in modes if name.startswith(("blinding/key", "blinding/study_words")) and name.endswith(".tsv")}
    assert "blinding/key.tsv" in secrets and "check.tsv" in modes and "work/series/sub-01/ses-m06/mask.nii.gz" in modes
    assert {name: oct(modes[name]) for name in secrets if modes[name] != 0o600} == {}
    assert {name: oct(mode) for name, mode in modes.items() if name not in secrets and mode != 0o644} == {}


def test_packages_are_blinded_and_audited(qa_cohort):
    root, _, results = qa_cohort
    assert (results / "blinding" / "audit.txt").read_text().startswith("clean")
    key = _key(results)
    for reader in READERS:
        worklist = json.loads((results / "qa" / reader / "worklist.json").read_text())
        codes = [c["code"] if "code" in c else c["case_code"] for c in worklist["cases"]]
        assert len(codes) == 6
        assert sorted(codes) == sorted(r["case_code"] for (rd, _, _), r in key.items() if rd == reader)
    r1 = {row["case_code"] for (rd, _, _), row in key.items() if rd == "R1"}
    r2 = {row["case_code"] for (rd, _, _), row in key.items() if rd == "R2"}
    assert not r1 & r2  # readers cannot line their worklists up
    assert not list((results / "qa").rglob("key*"))
    for path, data in _all_bytes(results / "qa"):
        for token in (b"sub-01", b"sub-02", b"baseline", b"2025-03-14", b"T2w"):
            assert token not in data, f"{path} contains {token!r}"
    # No reads yet: no final volume, no category.
    volumes = read_table(results / "volumes.tsv")
    assert {r["qa_status"] for r in volumes} == {"pending_read"}
    # Waiting for a reader is not an error, in the tables and in the run's last lines alike.
    assert {r["status"] for r in volumes} == {"pending"}
    assert {r["status"] for r in read_table(results / "response.tsv")} == {"pending"}
    assert "6 series, 0 with errors, 6 waiting for readers." in (root / "first_run.log").read_text()
    assert {r["volume_ml"] for r in volumes} == {"n/a"}
    assert all(r["volume_auto_ml"] != "n/a" for r in volumes)
    assert {r["category"] for r in read_table(results / "response.tsv")} == {"n/a"}


def test_reads_disagreement_adjudication_and_agreement(qa_cohort):
    root, config_path, results = qa_cohort
    key = _key(results)
    # R2 redraws sub-01's month-6 lesion much smaller: its category differs from R1's.
    rec = results / "work/series/sub-01/ses-m06"
    proposed = load_image(rec / "mask.nii.gz", "mask")
    small = np.zeros(proposed.data.shape, np.uint8)
    idx = np.argwhere(proposed.data != 0)
    small[tuple(idx[: len(idx) // 6].T)] = 1
    _read_all(results, key, {("R2", "sub-01", "ses-m06"): ("edited", mask_image(small, proposed.affine))})
    run_snakemake(root / "work", config_path)

    adjudication = read_table(results / "work/qa/adjudication.tsv")
    assert {(r["participant_id"], r["session_id"]) for r in adjudication} == {
        ("sub-01", "ses-baseline"), ("sub-01", "ses-m06")}
    adj_key = _key(results, "key_adjudication.tsv")
    assert {k for k, r in adj_key.items() if r["status"] == "case"} == {
        ("ADJ", "sub-01", "ses-baseline"), ("ADJ", "sub-01", "ses-m06")}
    assert len(list((results / "qa" / "ADJ").glob("*_reader-*_mask.nii.gz"))) == 4
    volumes = {(r["participant_id"], r["session_id"]): r for r in read_table(results / "volumes.tsv")}
    assert volumes[("sub-01", "ses-m06")]["qa_status"] == "pending_adjudication"
    assert volumes[("sub-02", "ses-m06")]["qa_status"] == "accepted"
    assert volumes[("sub-02", "ses-m06")]["volume_source"] == "R1:accept"
    assert (results / "derivatives/sub-01/ses-m06/anat/sub-01_ses-m06_desc-R2_label-lesion_mask.nii.gz").is_file()

    _read_all(results, adj_key)
    run_snakemake(root / "work", config_path)
    volumes = {(r["participant_id"], r["session_id"]): r for r in read_table(results / "volumes.tsv")}
    assert volumes[("sub-01", "ses-m06")]["volume_source"] == "ADJ:accept"
    assert volumes[("sub-01", "ses-m06")]["volume_ml"] == volumes[("sub-01", "ses-m06")]["volume_auto_ml"]
    response = {(r["participant_id"], r["session_id"]): r for r in read_table(results / "response.tsv")}
    assert response[("sub-01", "ses-m06")]["category"] == "partial_involution"
    assert response[("sub-01", "ses-m12")]["category"] == "complete_involution"
    agreement = {(r["comparison"], r["measure"]): r for r in read_table(results / "qa_agreement.tsv")}
    assert float(agreement[("R1 vs R2", "percent_agreement_category")]["estimate"]) == pytest.approx(75.0)
    assert agreement[("R2 vs auto", "dice_edited_masks_median")]["n"] == "1"
    assert (results / "qa_agreement.json").is_file()

    # The core lab's participant page shows the reads (unblinded: ids and readers) ...
    page = (results / "participants" / "sub-01.html").read_text()
    assert "<h2>Blinded reads</h2>" in page
    assert "<td>ses-m06</td><td>R2</td>" in page and "<td>edited</td>" in page and "<td>ADJ</td>" in page
    # ... and never reaches a reader: nothing under qa/ is a page, and the audit stays clean.
    for path, data in _all_bytes(results / "qa"):
        assert not data.startswith(b"%PDF") and b"<html" not in data.lower(), path
    assert (results / "blinding" / "audit.txt").read_text().startswith("clean")

    proc = run_snakemake(root / "work", config_path, "--dry-run")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_a_comment_naming_an_arm_stops_the_audit_its_findings_kept_until_redacted(qa_cohort):
    """Issue 24 item 1: the arms reach the comment check and the audit from the results folder; a comment
    stored before (here written straight to the store) stops the run with its findings kept, until redacted."""
    from khe_vol.cli import main

    root, config_path, results = qa_cohort
    config = yaml.safe_load(config_path.read_text())
    config["arms"] = ["sirolimus_prednisolone", "sirolimus"]
    config_path.write_text(yaml.safe_dump(config))
    run_snakemake(root / "work", config_path)  # qa_package reruns with the arms
    assert "arm\tsirolimus\n" in (results / "blinding" / "study_words.tsv").read_text()
    assert (results / "blinding" / "audit.txt").read_text().startswith("clean")
    row = next(r for (reader, _, _), r in sorted(_key(results).items()) if reader == "R1" and r["status"] == "case")
    sha = None if row["proposed_mask_sha256"] == "n/a" else row["proposed_mask_sha256"]
    record_read(results / "reads" / "R1.sqlite", "R1", row["case_code"], "accept", comment="patient on sirolimus",
                proposed_mask_sha256=sha)
    proc = run_snakemake(root / "work", config_path, check=False)
    assert proc.returncode != 0 and "qa_audit" in proc.stdout + proc.stderr
    assert not (results / "blinding" / "audit.txt").exists()  # Snakemake deletes a failed rule's output...
    findings = (results / "blinding" / "audit_findings.txt").read_text()  # ...but not the findings
    assert f"case {row['case_code']} revision" in findings and "sirolimus (arm)" in findings
    assert "khe-vol qa redact" in findings
    assert "blinding/audit_findings.txt" in (results / "logs" / "qa_audit.log").read_text()
    assert main(["qa", "redact", "--results-dir", str(results), "--reader", "R1", "--case", row["case_code"],
                 "--reason", "names an arm", "--by", "core lab"]) == 0
    assert main(["qa", "verify", "--results-dir", str(results)]) == 0
    run_snakemake(root / "work", config_path)
    assert (results / "blinding" / "audit.txt").read_text().startswith("clean")
    assert (results / "blinding" / "audit_findings.txt").read_text().startswith("clean")
