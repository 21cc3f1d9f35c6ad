"""Faults and reruns through real Snakemake runs: SIGKILL and resume, minimal reruns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from tests.test_workflow import REPO, run_snakemake

# End to end: `pytest -m "not slow"` leaves these out.
pytestmark = pytest.mark.slow


def _demo(root, n=2):
    subprocess.run([sys.executable, "-m", "khe_vol.cli", "demo", str(root / "demo"), "--participants", str(n)],
                   check=True, capture_output=True)


def _config(root, results):
    path = root / f"config-{results}.yaml"
    path.write_text(yaml.safe_dump({
        "imaging_dir": str(root / "demo/imaging"), "seeds": str(root / "demo/seeds.tsv"),
        "results_dir": str(root / results), "sessions": {"baseline": 0, "m06": 6, "m12": 12},
    }))
    return path


def _outputs(results):
    """Result files that must not depend on how the run went (logs, benchmarks, timestamps excluded)."""
    return {p.relative_to(results): p.read_bytes() for p in sorted(Path(results).rglob("*"))
            if p.is_file() and not {"logs", "benchmarks"} & set(p.parts) and p.name != ".snakemake_timestamp"}


def _same(a_dir, a, b_dir, b):
    # Provenance names the results folder itself; nothing else may differ.
    assert set(a) == set(b)
    for rel in a:
        assert a[rel].replace(str(a_dir).encode(), b"<R>") == b[rel].replace(str(b_dir).encode(), b"<R>"), rel


def _job_counts(output):
    """Snakemake's "Job stats" table: rule -> count."""
    counts, in_table = {}, False
    for line in output.splitlines():
        if line.startswith("Job stats"):
            in_table = True
            continue
        parts = line.split()
        if in_table and len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
        elif in_table and parts and parts[0] == "total":
            break
    return counts


def test_sigkill_mid_run_then_resume_gives_identical_outputs(tmp_path):
    _demo(tmp_path)
    killed = _config(tmp_path, "killed")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path / "work"),
           "--cores", "1", "--configfile", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    records = tmp_path / "killed/work/series"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        # Kill while a series job is running, not in the instant one finishes
        # (a job Snakemake has not yet recorded as finished is rightly redone).
        n = len(list(records.rglob("record.json")))
        time.sleep(1.0)
        if n >= 2 and len(list(records.rglob("record.json"))) == n:
            break
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job tree, as a crash or an OOM kill would
    proc.wait()
    done_before = {p: p.stat().st_mtime_ns for p in records.rglob("record.json")}
    assert 2 <= len(done_before) < 6, "the kill must land mid-run"

    # What a user does after a crash: release the lock, rerun (incomplete jobs are redone).
    run_snakemake(tmp_path / "work", killed, "--unlock")
    run_snakemake(tmp_path / "work", killed, "--rerun-incomplete")
    for path, mtime in done_before.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was redone although it was complete"

    clean = _config(tmp_path, "clean")
    run_snakemake(tmp_path / "work-clean", clean)
    _same(tmp_path / "killed", _outputs(tmp_path / "killed"), tmp_path / "clean", _outputs(tmp_path / "clean"))


def test_rerun_does_nothing_and_one_changed_series_reruns_only_its_job(tmp_path):
    _demo(tmp_path)
    config = _config(tmp_path, "results")
    run_snakemake(tmp_path / "work", config)
    proc = run_snakemake(tmp_path / "work", config)
    assert "Nothing to be done" in proc.stdout + proc.stderr

    # A site re-sends one follow-up series with one voxel changed.
    path = tmp_path / "demo/imaging/sub-demo02/ses-m12/anat/sub-demo02_ses-m12_T2w.nii.gz"
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] += 1
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    proc = run_snakemake(tmp_path / "work", config)
    counts = _job_counts(proc.stdout + proc.stderr)
    assert counts.get("measure_series") == 1, counts
