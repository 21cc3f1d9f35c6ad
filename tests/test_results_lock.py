"""Two runs on one results folder, started from different working directories, with real processes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from khe_vol.runlock import LOCK_NAME, ResultsFolderBusy, lock_results_dir, release_results_dir
from tests.cohort import write_mask_cohort
from tests.test_workflow import REPO, run_snakemake

# End to end: `pytest -m "not slow"` leaves these out.
pytestmark = pytest.mark.slow

HOLD = (
    "import sys; from khe_vol.runlock import lock_results_dir; "
    "h = lock_results_dir(sys.argv[1]); print('locked', flush=True); sys.stdin.read()"
)


def test_a_second_run_on_a_busy_results_folder_is_refused(tmp_path):
    config = write_mask_cohort(tmp_path)
    results = tmp_path / "results"
    # 1. Another process holds the folder: the run stops before any job, naming the folder and the holder.
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(results)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = run_snakemake(tmp_path / "work_b", config, check=False)
        out = refused.stdout + refused.stderr
        assert refused.returncode != 0, out
        assert f"results folder {results} is in use by another khe-vol run (pid {holder.pid} on" in out, out
        assert "Wait until that run ends" in out and "another results_dir" in out
        assert not (results / "volumes.tsv").exists() and not (results / "work").exists()
        # a dry run only looks: it takes no lock and is not refused
        assert run_snakemake(tmp_path / "work_b", config, "--dry-run", check=False).returncode == 0
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # 2. A running Snakemake process holds the folder for its whole run, and lets go at the end.
    run = subprocess.Popen([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                            str(tmp_path / "work_a"), "--cores", "2", "--configfile", str(config)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = results / LOCK_NAME
    while run.poll() is None and f"pid {run.pid} " not in (lock.read_text() if lock.exists() else ""):
        time.sleep(0.05)
    with pytest.raises(ResultsFolderBusy, match=f"pid {run.pid} on .*started in {tmp_path / 'work_a'}"):
        lock_results_dir(results)
    assert run.poll() is None  # the refusal above was the running workflow's lock
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-4000:]
    assert lock.read_text() == ""  # the holder's name is cleared: finished runs leave the same bytes
    release_results_dir(lock_results_dir(results))  # free again
