"""A user's own study config, run from the repository root exactly as a user runs it.

The other workflow tests run with ``--directory <tmp>``, where no ``config/config.yaml``
exists, so they never saw the demo config leak into a study's. These run in the
repository itself, after the demo exists, and leave nothing behind in it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.cohort import ball_scene
from tests.conftest import make_affine, save_nifti
from tests.test_workflow import read_tsv

# End to end: `pytest -m "not slow"` leaves these out.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: The study's own schedule: month 0 is "screening", and there is no m24 (a m24 series is an error).
SESSIONS = {"screening": 0, "m03": 3, "m09": 9}
RADII_MM = {"screening": 10.0, "m03": 8.0, "m09": 9.5}


def _repo_files():
    """Files in the repository a run could leave behind (not git's, npm's or caches)."""
    skip = {".git", "node_modules", "__pycache__", ".pytest_cache", ".hypothesis"}
    return {p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)}


@pytest.fixture(scope="module")
def repo_root_run():
    """Yield a helper running snakemake in the repository root; clean the repository afterwards.

    The demo cohort (README command 1) is written first if it is not there, and
    removed again afterwards if this test wrote it. Snakemake's own metadata
    under ``.snakemake/`` for this test's runs is removed too.
    """
    before = _repo_files()
    had_snakemake_dir = (REPO / ".snakemake").exists()
    wrote_demo = not (REPO / "demo/seeds.tsv").is_file()
    if wrote_demo:
        subprocess.run([sys.executable, "-m", "khe_vol.cli", "demo", "demo"], cwd=REPO, check=True,
                       capture_output=True, timeout=600)

    def run(*args, check=True):
        proc = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=900)
        if check and proc.returncode != 0:
            raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    try:
        yield run
    finally:
        if wrote_demo:
            shutil.rmtree(REPO / "demo", ignore_errors=True)
        if not had_snakemake_dir:
            shutil.rmtree(REPO / ".snakemake", ignore_errors=True)
        for path in _repo_files() - before:
            if ".snakemake" in path.relative_to(REPO).parts:
                path.unlink()
    left = sorted(str(p.relative_to(REPO)) for p in _repo_files() - before)
    assert not left, f"the test left files in the repository: {left}"


def write_study(root):
    """A two-participant study with reader masks for every series: no seeds, no allocation."""
    rng = np.random.default_rng(3)
    shape = (40, 40, 12)
    aff = make_affine((1.0, 1.0, 3.0), (-20, -20, -18))
    for pid in ("s01", "s02"):
        for ses, radius in [*RADII_MM.items(), *([("m24", 8.0)] if pid == "s01" else [])]:
            image, mask = ball_scene(shape, aff, np.zeros(3), radius, rng)
            base = f"sub-{pid}/ses-{ses}/anat/sub-{pid}_ses-{ses}"
            save_nifti(root / "imaging" / f"{base}_T2w.nii.gz", image, aff)
            save_nifti(root / "masks" / f"{base}_label-lesion_mask.nii.gz", mask, aff)
    # a session exported as DICOM only: reported, not skipped without a word
    dicom = root / "imaging/sub-s02/ses-m12/DICOM/IM0001"
    dicom.parent.mkdir(parents=True)
    dicom.write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 64)
    config = {
        "imaging_dir": str(root / "imaging"),
        "masks_dir": str(root / "masks"),
        "results_dir": str(root / "results"),
        "sessions": SESSIONS,
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_study_config_takes_nothing_from_the_demo(repo_root_run, tmp_path):
    config = write_study(tmp_path)
    proc = repo_root_run("--cores", "2", "--configfile", str(config))
    results = tmp_path / "results"
    volumes = read_tsv(results / "volumes.tsv")
    assert {r["participant_id"] for r in volumes} == {"sub-s01", "sub-s02"}, volumes
    rows = {(r["participant_id"], r["session_id"]): r for r in volumes}
    for pid in ("sub-s01", "sub-s02"):
        for ses in SESSIONS:
            assert rows[(pid, f"ses-{ses}")]["status"] == "ok", rows[(pid, f"ses-{ses}")]
            assert rows[(pid, f"ses-{ses}")]["method"] == "reader_mask"
    # the demo's sessions are not merged in: ses-m24 is not a session of this study
    m24 = rows[("sub-s01", "ses-m24")]
    assert m24["status"] == "error" and "not in the config sessions" in m24["message"], m24
    response = read_tsv(results / "response.tsv")
    assert {r["session_id"] for r in response if r["status"] == "ok"} == {"ses-m03", "ses-m09"}
    assert all(r["baseline_volume_ml"] != "n/a" for r in response if r["status"] == "ok")
    # no allocation: no by-arm table (the demo's allocation is not used)
    assert not (results / "response_by_arm.tsv").exists()
    assert "response_by_arm" not in proc.stdout + proc.stderr
    provenance = json.loads((results / "provenance.json").read_text())
    cfg = provenance["Config"]
    assert cfg["allocation"] is None and cfg["seeds"] is None and cfg["arms"] is None
    assert cfg["sessions"] == SESSIONS
    everything = "".join(p.read_text(errors="replace") for p in results.rglob("*") if p.is_file()
                         and p.suffix in (".tsv", ".json"))
    assert "demo" not in everything
    # `khe-vol check` resolves the config by the same function: the same problems as the workflow's check.tsv
    check = subprocess.run([sys.executable, "-m", "khe_vol.cli", "check", str(config), "--headers-only", "--no-fail"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert check.stdout == (results / "check.tsv").read_text()
    assert "ses-m24" in check.stdout
    dicom_rows = [r for r in read_tsv(results / "check.tsv") if "DICOM" in r["problem"]]
    assert len(dicom_rows) == 1 and "sub-s02/ses-m12/DICOM" in dicom_rows[0]["problem"], dicom_rows
    assert "dcm2niix" in dicom_rows[0]["problem"]
    assert "check.tsv: 2 problem(s) with the inputs" in proc.stdout + proc.stderr


def test_snakemake_without_a_configfile_says_to_pass_one(repo_root_run):
    proc = repo_root_run("--cores", "1", "--dry-run", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "--configfile" in out and "config/config.yaml" in out, out
    assert "measure_series" not in out  # nothing of the demo was planned
