"""The demo cohort through a real SLURM cluster (profiles/slurm, snakemake-executor-plugin-slurm).

Needs a running cluster whose nodes see this machine's temporary directory:
`.ci/slurm/start-cluster.sh` (as root; `sudo` it otherwise) starts a single-node one on 127.0.0.1.
In CI (environment CI=true; `.ci/run` starts the cluster) the test is required: no cluster is a
failure. Elsewhere, without a cluster, it is skipped with a reason that says how to run it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_workflow import REPO, read_tsv, run_snakemake

# End to end: `pytest -m "not slow"` leaves these out.
pytestmark = pytest.mark.slow

PROFILE = REPO / "profiles/slurm"
START = ".ci/slurm/start-cluster.sh"
TIMEOUT_S = 900  # a hung status poll must fail the test, not eat the CI job
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.$", re.MULTILINE)
# One SLURM job per series, one montage and one page job per participant, one per cohort step; `all` stays local.
EXPECTED_RULES = {"check_study": 1, "measure_series": 6, "tables": 1, "derivatives": 1, "response_by_arm": 1,
                  "figures": 1, "response_page": 1, "response_by_arm_page": 1, "montages": 2, "participant_page": 2,
                  "workbook": 1, "provenance": 1}


def cluster_problem():
    """None if a SLURM node takes jobs, else what is wrong."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "the SLURM client (sinfo, sbatch) is not installed"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s"
    if proc.returncode != 0:
        return f"sinfo failed: {proc.stderr.strip()}"
    states = [s.rstrip("*~#!%$@^-") for s in proc.stdout.split()]
    if not {"idle", "mix", "alloc", "comp"} & set(states):
        return f"no SLURM node is up (sinfo states: {states or 'none'})"
    return None


def slurm_env():
    """This environment, with this Python's bin first: the jobs (sbatch --export=ALL) run the same khe-vol."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def in_ci():
    """CI sets CI=true (GitHub Actions, GitLab CI and others do; `.ci/run` runs there)."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def how_to_start():
    runner = f"{START}" if os.geteuid() == 0 else f"sudo {START}"
    return (f"start a single-node cluster with `{runner}` (as root; installs Debian's slurmctld, slurmd, "
            "slurm-client and munge) and run the tests again")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A two-participant demo cohort (6 series) and a config per run, differing only in results_dir."""
    problem = cluster_problem()
    if problem and in_ci():
        pytest.fail(f"SLURM test (required in CI, CI=true): {problem}; {how_to_start()}", pytrace=False)
    if problem:
        pytest.skip(f"no SLURM cluster here ({problem}): to run this test, {how_to_start()}")
    root = tmp_path_factory.mktemp("slurm")
    subprocess.run([sys.executable, "-m", "khe_vol.cli", "demo", str(root / "demo"), "--participants", "2"],
                   check=True, capture_output=True)
    configs = {}
    for name in ("slurm", "local"):
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({
            "imaging_dir": str(root / "demo/imaging"), "seeds": str(root / "demo/seeds.tsv"),
            "allocation": str(root / "demo/allocation.tsv"), "arms": ["sirolimus_prednisolone", "sirolimus"],
            "results_dir": str(root / f"results_{name}"),
        }))
    return root, configs


@pytest.fixture(scope="module")
def slurm_run(cohort):
    root, configs = cohort
    workdir = root / "work_slurm"
    cmd = ["timeout", "--kill-after=60", str(TIMEOUT_S),
           sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configs["slurm"]), "--profile", str(PROFILE),
           # the test cluster has no slurmdbd: poll squeue, no accounts; poll early; keep the job logs
           "--slurm-status-command", "squeue", "--slurm-no-account",
           "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S + 120, env=slurm_env(), check=False)
    out = proc.stdout + proc.stderr
    submitted = [(int(j), int(s), Path(log)) for j, s, log in SUBMITTED.findall(out)]
    if proc.returncode != 0:
        if submitted:  # leave nothing queued behind a failed or timed-out run
            subprocess.run(["scancel", *(str(s) for _, s, _ in submitted)], capture_output=True, check=False)
        why = f"timed out after {TIMEOUT_S} s" if proc.returncode == 124 else f"failed ({proc.returncode})"
        raise AssertionError(f"snakemake --executor slurm {why}:\n{out[-6000:]}")
    return root, workdir, out, submitted, time.monotonic() - start


def job_history(jobids):
    """Finished jobs as SLURM recorded them: {jobid: {JobState, JobName, ExitCode, WorkDir}}.

    From sacct where there is accounting (slurmdbd), else from the job completion log
    (JobCompType=jobcomp/filetxt, as .ci/slurm/start-cluster.sh sets up), else from squeue
    (which keeps finished jobs for MinJobAge seconds).
    """
    ids = ",".join(str(j) for j in jobids)
    sacct = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ids, "-o", "JobIDRaw,JobName,State,ExitCode,WorkDir"],
                           capture_output=True, text=True, check=False)
    if sacct.returncode == 0 and sacct.stdout.strip():
        return {int(r[0]): dict(zip(("JobName", "JobState", "ExitCode", "WorkDir"), r[1:]))
                for r in (line.split("|") for line in sacct.stdout.splitlines())}
    conf = dict(re.findall(r"^(\w+)\s*=\s*(.*?)\s*$",
                           subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=False).stdout, re.MULTILINE))
    if conf.get("JobCompType", "").endswith("filetxt") and Path(conf.get("JobCompLoc", "")).is_file():
        history = {}
        for line in Path(conf["JobCompLoc"]).read_text().splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if fields.get("JobId", "").isdigit() and int(fields["JobId"]) in jobids:
                fields["JobName"] = fields["Name"]
                history[int(fields["JobId"])] = fields
        return history
    squeue = subprocess.run(["squeue", "--states=all", "-h", "-j", ids, "-o", "%i|%j|%T|%Z"],
                            capture_output=True, text=True, check=False)
    return {int(r[0]): {"JobName": r[1], "JobState": r[2], "ExitCode": "0:0", "WorkDir": r[3]}
            for r in (line.split("|") for line in squeue.stdout.splitlines()) if r[0].isdigit()}


def test_every_job_ran_under_slurm(slurm_run):
    _, workdir, out, submitted, seconds = slurm_run
    print(f"SLURM run of the 2-participant demo: {seconds:.0f} s")
    rules = {}
    for _, _, log in submitted:
        rule = next(p for p in log.parts if p.startswith("rule_"))[len("rule_"):]
        rules[rule] = rules.get(rule, 0) + 1
    assert rules == EXPECTED_RULES, out[-3000:]
    jobids = {s for _, s, _ in submitted}
    assert len(jobids) == len(submitted)
    # Each job's SLURM log (kept) shows Snakemake running that job's rule inside the allocation.
    for _, jobid, log in submitted:
        assert log.is_file() and log.is_relative_to(workdir / ".snakemake/slurm_logs") and log.stem == str(jobid), log
        rule = next(p for p in log.parts if p.startswith("rule_"))[len("rule_"):]
        text = log.read_text()
        assert "--executor slurm-jobstep" in text and f"Finished jobid: 0 (Rule: {rule})" in text, text[-2000:]
    # SLURM's own record: every job completed with exit code 0, in this run's working directory,
    # under one job name (the plugin's run id).
    history = {}
    for _ in range(20):  # the completion record may trail the state squeue showed by a moment
        history = job_history(jobids)
        if set(history) == jobids:
            break
        time.sleep(0.5)
    assert set(history) == jobids, (sorted(jobids), history)
    assert {h["JobState"] for h in history.values()} == {"COMPLETED"}, history
    assert {h["ExitCode"] for h in history.values()} == {"0:0"}, history
    assert {h["WorkDir"] for h in history.values()} == {str(workdir)}, history
    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)
    assert {h["JobName"] for h in history.values()} == {run_id}, history


def test_outputs_equal_a_local_run(slurm_run, cohort):
    root, configs = cohort
    run_snakemake(root / "work_local", configs["local"])
    slurm_res, local_res = root / "results_slurm", root / "results_local"
    rows = read_tsv(slurm_res / "volumes.tsv")
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}, rows

    def outputs(res):
        return sorted(p.relative_to(res) for p in res.rglob("*") if p.is_file() and "logs" not in p.parts
                      and "benchmarks" not in p.parts and p.name != ".snakemake_timestamp")

    assert outputs(slurm_res) == outputs(local_res)
    assert any(p.name.endswith("_label-lesion_mask.nii.gz") for p in outputs(slurm_res))
    for rel in outputs(slurm_res):
        # Provenance names the results folder itself: the one allowed difference.
        a = (slurm_res / rel).read_bytes().replace(str(slurm_res).encode(), b"<R>")
        b = (local_res / rel).read_bytes().replace(str(local_res).encode(), b"<R>")
        assert a == b, f"{rel} differs between the SLURM and the local run: {first_difference(a, b)}"


def first_difference(a: bytes, b: bytes) -> str:
    """Where two outputs part, in a line a person can read."""
    if a[:2] == b"\x1f\x8b" or b"\0" in a[:1024]:
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return f"binary, first different byte at {i} (sizes {len(a)}, {len(b)})"
    for n, (x, y) in enumerate(zip(a.decode().splitlines(), b.decode().splitlines()), 1):
        if x != y:
            return f"line {n}:\n  slurm: {x[:500]}\n  local: {y[:500]}"
    return f"one is a prefix of the other (sizes {len(a)}, {len(b)})"
