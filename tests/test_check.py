"""`khe-vol check` reports every problem in a study folder at once."""

import subprocess
import sys

import yaml

from tests.cohort import write_mask_cohort
from tests.test_workflow import add_bad_series


def run_check(*args):
    return subprocess.run([sys.executable, "-m", "khe_vol.cli", "check", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_clean_study_passes(tmp_path):
    config = write_mask_cohort(tmp_path)
    proc = run_check(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no problems found" in proc.stderr
    assert proc.stdout == ""  # no bare table header


def test_warnings_baseline_only_and_sessions_out_of_order(tmp_path):
    """Nothing stops the run, but a coordinator is told what to look at."""
    config = write_mask_cohort(tmp_path)  # sub-01, sub-02: baseline, m06, m12
    imaging = tmp_path / "imaging"
    src = next(imaging.glob("sub-01/ses-baseline/anat/*_T2w.nii.gz"))
    lonely = imaging / "sub-03/ses-baseline/anat/sub-03_ses-baseline_T2w.nii.gz"
    lonely.parent.mkdir(parents=True)
    lonely.write_bytes(src.read_bytes())
    seeds = tmp_path / "seeds.tsv"
    seeds.write_text("participant_id\tx\ty\tz\nsub-03\t0\t0\t0\n")
    cfg = yaml.safe_load(config.read_text())
    cfg["seeds"] = str(seeds)
    config.write_text(yaml.safe_dump(cfg))
    # BIDS sessions file (sub-01): m12 dated before m06
    (imaging / "sub-01/sub-01_sessions.tsv").write_text(
        "session_id\tacq_time\nses-baseline\t2025-01-10T09:00:00\nses-m06\t2025-07-11T10:00:00\n"
        "ses-m12\t2025-03-02T08:30:00\n")
    # khe-vol import's UID map beside the imaging folder (sub-02): m06 dated before the baseline
    (tmp_path / "dicom_uids.tsv").write_text(
        "participant_id\tsession_id\tstudy_date\nsub-02\tses-baseline\t20250301\nsub-02\tses-m06\t20250201\n")
    proc = run_check(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [dict(zip(("participant_id", "session_id", "problem", "severity"), line.split("\t")))
            for line in proc.stdout.splitlines()[1:]]
    assert proc.stdout.splitlines()[0] == "participant_id\tsession_id\tproblem\tseverity"
    assert all(r["severity"] == "warning" for r in rows), rows
    got = {(r["participant_id"], r["session_id"]): r["problem"] for r in rows}
    assert "baseline only" in got[("sub-03", "ses-baseline")]
    assert "2025-03-02" in got[("sub-01", "ses-m12")] and "ses-m06" in got[("sub-01", "ses-m12")]
    assert "2025-02-01" in got[("sub-02", "ses-m06")] and "ses-baseline" in got[("sub-02", "ses-m06")]
    assert len(rows) == 3 and "no problems found, 3 warning(s)" in proc.stderr


def test_every_problem_reported_at_once(tmp_path):
    config = write_mask_cohort(tmp_path)
    bad = add_bad_series(tmp_path)
    seeds = tmp_path / "seeds.tsv"
    seeds.write_text("participant_id\tx\ty\tz\nsub-01\t900\t0\t0\nsub-77\t0\t0\t0\n")
    cfg = yaml.safe_load(config.read_text())
    cfg["seeds"] = str(seeds)
    config.write_text(yaml.safe_dump(cfg))
    proc = run_check(config)
    assert proc.returncode == 1
    report = proc.stdout
    for (pid, ses), words in bad.items():
        assert any(line.startswith(f"{pid}\t") and words in line for line in report.splitlines()), (pid, words, report)
    assert "sub-77" in report  # seed for a participant without images
    n_problems = sum(line.endswith("\tproblem") for line in report.splitlines())
    assert f"{n_problems} problem(s) found" in proc.stderr and n_problems >= len(bad)
    dicom = tmp_path / "imaging/sub-01/ses-m06/anat/IM0001"
    dicom.write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 64)
    report = run_check(config).stdout
    assert any(line.startswith("n/a\tn/a\t") and str(dicom.parent) in line and "DICOM" in line
               for line in report.splitlines()), report
    # headers only: quicker, and still finds the header problems
    quick = run_check(config, "--headers-only", "--no-fail")
    assert quick.returncode == 0 and "3 volumes" in quick.stdout and "NaN" not in quick.stdout


def test_bad_config_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("imaging_dir: 5\nfoo: 1\n")
    proc = run_check(cfg)
    assert proc.returncode == 2 and "foo" in proc.stderr and str(cfg) in proc.stderr


def test_allocation_and_imaging_disagreements_are_reported(tmp_path):
    config = write_mask_cohort(tmp_path)  # imaged: sub-01, sub-02
    allocation = tmp_path / "allocation.tsv"
    allocation.write_text("participant_id\tarm\nsub-01\tSP\nsub-05\tS\n")
    cfg = yaml.safe_load(config.read_text())
    cfg.update(allocation=str(allocation), arms=["SP", "S"], primary_month=6)
    config.write_text(yaml.safe_dump(cfg))
    proc = run_check(config)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = [line.split("\t")[:3] for line in proc.stdout.splitlines()[1:]]
    assert any(pid == "sub-02" and "not in the allocation" in msg and str(allocation) in msg for pid, _, msg in rows), rows
    assert any(pid == "sub-05" and "no imaging" in msg and "non-responder" in msg for pid, _, msg in rows), rows
    # a broken allocation file is a problem naming it, not a crash
    allocation.write_text("participant_id\tgroup\nsub-01\tSP\n")
    proc = run_check(config)
    assert proc.returncode == 1 and str(allocation) in proc.stdout and "arm" in proc.stdout, proc.stdout + proc.stderr
