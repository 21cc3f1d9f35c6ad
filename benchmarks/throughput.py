"""Throughput benchmark: a trial-size cohort through the whole workflow on one machine.

Generates (once, then reused) 73 synthetic participants x baseline, m06, m12 =
219 series of 320x320x40 fat-suppressed T2 at 0.55x0.55x4 mm (bias field,
noise, oblique and differently oriented grids, repositioning, growing,
shrinking and vanishing lesions), runs ``snakemake --cores N`` on it from
scratch, and prints:

- wall time of the run;
- CPU seconds and peak RSS per series job (from Snakemake's ``benchmark:`` files);
- the floor measured in the same run: reading every series with nibabel on N processes;
- the CPU time of the whole run (every process, from rusage), how busy that kept
  the N cores, and the CPU time of the Snakemake process itself (psutil);
- Snakemake's own share of the wall time: the part not covered by jobs running
  on all N cores, ``1 - sum(job wall) / (N x wall)`` over the jobs that keep
  benchmark files (series and montages; the few cohort-wide steps count as
  Snakemake's), and its start-up (DAG) time.

Usage, from the repository root (takes 15-25 minutes on 2 cores)::

    python benchmarks/throughput.py                # writes results/benchmark_throughput.json
    python benchmarks/throughput.py --participants 10   # a quicker look

To see where a job's time goes: ``pip install pyinstrument`` and add ``--profile``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from khe_vol import phantom

REPO = Path(__file__).resolve().parents[1]
SHAPE = (320, 320, 40)
VOXEL_MM = (0.55, 0.55, 4.0)
SESSIONS = (("baseline", 0), ("m06", 6), ("m12", 12))
#: Month-12 volume ratios, cycled: every category, a small residue and complete involution.
M12_RATIOS = (1.4, 0.95, 0.55, 0.12, 0.0, 0.7, 1.25, 0.35)
ORIENTATIONS = ("axial_lps", "axial_ras", "axial_lps")


def participant_series(index, rng_seed=2026):
    """Anatomy and (session, month, SeriesSpec) of one benchmark participant."""
    rng = np.random.default_rng([rng_seed, index])
    m12 = M12_RATIOS[index % len(M12_RATIOS)]
    ratios = (1.0, 1.0 + (m12 - 1.0) * 0.6, m12)
    for attempt in range(20):
        anatomy = phantom.make_anatomy(int(rng.integers(1 << 31)))
        specs = []
        for n, ((label, month), ratio) in enumerate(zip(SESSIONS, ratios)):
            specs.append((label, month, phantom.SeriesSpec(
                shape=SHAPE, voxel_mm=VOXEL_MM, orientation=ORIENTATIONS[(index + n) % 3],
                oblique_deg=float(rng.uniform(0, 12)), snr=float(rng.uniform(12, 30)),
                bias_amplitude=float(rng.uniform(0.2, 0.5)),
                rotation_deg=tuple(rng.uniform(-4, 4, 3)) if n else (0.0, 0.0, 0.0),
                translation_mm=tuple(rng.uniform(-10, 10, 3)) if n else (0.0, 0.0, 0.0),
                volume_ratio=float(ratio), rng_seed=int(rng.integers(1 << 31)))))
        if all(phantom.lesion_fits_fov(anatomy, spec) for _, _, spec in specs):
            return anatomy, specs
    raise RuntimeError(f"participant {index}: lesion does not fit the field of view")


def _write_participant(args):
    index, out = args
    pid = f"sub-tp{index + 1:03d}"
    anatomy, specs = participant_series(index)
    seed = None
    for label, _, spec in specs:
        ph = phantom.render_series(anatomy, spec)
        path = Path(out) / "imaging" / pid / f"ses-{label}" / "anat" / f"{pid}_ses-{label}_T2w.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(phantom.nifti_gz_bytes(ph.image, ph.affine, np.int16, "khe-vol throughput phantom"))
        if label == "baseline":  # where a reader clicks, not the lesion's deepest point
            seed = phantom.phantom_reader_seeds(anatomy, spec, ph, np.random.default_rng([2026, index, 3]))[0]
    return pid, seed


def make_cohort(out, n_participants, cores):
    """Write the cohort (images and seeds) unless the same one is already there."""
    out = Path(out)
    stamp = out / "cohort.json"
    spec = {"participants": n_participants, "shape": SHAPE, "voxel_mm": VOXEL_MM, "version": 2}
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(spec)):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with ProcessPoolExecutor(cores) as pool:
        seeds = list(pool.map(_write_participant, [(i, str(out)) for i in range(n_participants)]))
    lines = ["participant_id\tx\ty\tz"] + [f"{pid}\t" + "\t".join(f"{v:.2f}" for v in s) for pid, s in seeds]
    (out / "seeds.tsv").write_text("\n".join(lines) + "\n")
    stamp.write_text(json.dumps(spec))
    return out


def workflow_command(work, cohort, results, cores, sessions=SESSIONS):
    """The snakemake command for a phantom cohort (``imaging/``, ``seeds.tsv``), from scratch.

    Empties ``results`` and ``work/run``, writes ``work/config.yaml``.
    """
    work = Path(work)
    shutil.rmtree(results, ignore_errors=True)
    shutil.rmtree(work / "run", ignore_errors=True)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({
        "imaging_dir": str(Path(cohort) / "imaging"), "seeds": str(Path(cohort) / "seeds.tsv"),
        "results_dir": str(results), "sessions": {label: month for label, month in sessions},
        "allocation": None, "arms": None,
    }))
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work / "run"),
            "--configfile", str(config), "--cores", str(cores)]


def _load(path):
    img = nib.load(path)
    return float(np.asarray(img.dataobj, dtype=np.float32).sum())


def nibabel_floor_seconds(paths, cores):
    """Wall seconds to read every series' voxels with nibabel on ``cores`` processes."""
    t0 = time.perf_counter()
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(_load, paths, chunksize=4))
    return time.perf_counter() - t0


def job_benchmarks(results, rule="measure_series"):
    """Snakemake benchmark rows of one rule's jobs (``*`` for every rule that keeps them)."""
    rows = []
    for path in sorted((Path(results) / "benchmarks").glob(f"{rule}/*.tsv")):
        with open(path, newline="") as fh:
            row = next(csv.DictReader(fh, delimiter="\t"))
        rows.append({"series": path.stem, "wall_s": float(row["s"]), "cpu_s": float(row["cpu_time"]),
                     "max_rss_mb": float(row["max_rss"])})
    return rows


def run_and_sample_own_cpu(cmd, log, interval_s=0.5):
    """Run ``cmd``; return the finished process and the CPU seconds of that process alone.

    psutil separates a process's own CPU time from its reaped children's (the
    jobs), so sampling the Snakemake process gives Snakemake's own cost; the
    last sample before it exits misses at most ``interval_s``.
    """
    import psutil

    own = 0.0
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                t = watched.cpu_times()
                own = t.user + t.system
            except psutil.Error:
                break
            time.sleep(interval_s)
        proc.wait()
    return proc, own


def percentile(values, q):
    return float(np.percentile(values, q)) if values else math.nan


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=73)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--work", default="results/throughput", help="cohort and run folder")
    parser.add_argument("--out", default="results/benchmark_throughput.json")
    parser.add_argument("--profile", action="store_true", help="also profile one series job with pyinstrument")
    args = parser.parse_args(argv)

    work = Path(args.work).resolve()
    print(f"== cohort: {args.participants} participants x 3 sessions of {SHAPE} at {VOXEL_MM} mm", flush=True)
    t0 = time.perf_counter()
    cohort = make_cohort(work / "cohort", args.participants, args.cores)
    print(f"   ready in {time.perf_counter() - t0:.0f} s (reused when already there)", flush=True)
    paths = sorted(str(p) for p in (cohort / "imaging").rglob("*_T2w.nii.gz"))

    results = work / "results"
    base = workflow_command(work, cohort, results, args.cores)
    t0 = time.perf_counter()
    subprocess.run([*base, "--dry-run", "--quiet"], check=True, capture_output=True)
    dag_s = time.perf_counter() - t0
    print(f"== snakemake --cores {args.cores} (DAG and start-up alone: {dag_s:.1f} s)", flush=True)
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc, snakemake_own_cpu_s = run_and_sample_own_cpu(base, log=work / "snakemake.log")
    wall_s = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Every process of the run, Snakemake and all jobs (reaped children count):
    # a check on the benchmark files, whose psutil sampling misses a job's last moments.
    run_cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if proc.returncode:
        print((work / "snakemake.log").read_text()[-3000:])
        return 1
    jobs = job_benchmarks(results)
    floor_s = nibabel_floor_seconds(paths, args.cores)
    busy = sum(j["wall_s"] for j in job_benchmarks(results, "*")) / (args.cores * wall_s)
    summary = {
        "series": len(paths),
        "cores": args.cores,
        "wall_s": round(wall_s, 1),
        "wall_min": round(wall_s / 60, 2),
        "job_cpu_s_median": round(statistics.median(j["cpu_s"] for j in jobs), 2),
        "job_cpu_s_p90": round(percentile([j["cpu_s"] for j in jobs], 90), 2),
        "job_cpu_s_max": round(max(j["cpu_s"] for j in jobs), 2),
        "job_peak_rss_mb_median": round(statistics.median(j["max_rss_mb"] for j in jobs), 1),
        "job_peak_rss_mb_max": round(max(j["max_rss_mb"] for j in jobs), 1),
        "nibabel_floor_s": round(floor_s, 1),
        "snakemake_share_of_wall_pct": round(100 * (1 - busy), 1),
        "run_cpu_s": round(run_cpu_s, 1),
        "snakemake_own_cpu_s": round(snakemake_own_cpu_s, 1),
        "snakemake_own_cpu_pct_of_cores": round(100 * snakemake_own_cpu_s / (args.cores * wall_s), 1),
        "cores_busy_pct": round(100 * run_cpu_s / (args.cores * wall_s), 1),
        "snakemake_dag_startup_s": round(dag_s, 1),
        "series_with_errors": sum(json.loads(p.read_text())["status"] != "ok"
                                  for p in (results / "work" / "series").rglob("record.json")),
    }
    print(json.dumps(summary, indent=2))
    if args.profile:
        summary["profile"] = profile_one_job(cohort, work)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "jobs": jobs}, indent=2) + "\n")
    print(f"written {out}")
    return 0


def profile_one_job(cohort, work):
    """pyinstrument text profile of one seeded baseline job (the tracked ones add registration)."""
    pid = "sub-tp001"
    seeds = {r["participant_id"]: r for r in csv.DictReader(open(cohort / "seeds.tsv"), delimiter="\t")}
    image = cohort / "imaging" / pid / "ses-baseline" / "anat" / f"{pid}_ses-baseline_T2w.nii.gz"
    out_txt = work / "profile_series.txt"
    cmd = [sys.executable, "-m", "pyinstrument", "-o", str(out_txt), "-m", "khe_vol.cli", "series",
           "--participant", pid, "--session", "ses-baseline", "--month", "0", "--image", str(image),
           "--seed", seeds[pid]["x"], seeds[pid]["y"], seeds[pid]["z"],
           "--record", str(work / "profile_record.json"), "--mask", str(work / "profile_mask.nii.gz")]
    subprocess.run(cmd, check=True, capture_output=True)
    print(out_txt.read_text()[:4000])
    return str(out_txt)


if __name__ == "__main__":
    sys.exit(main())
