"""Segmentation accuracy benchmark: realistic phantoms and real expert-segmented scans.

Runs the workflow's own per-series path (:func:`khe_vol.series.measure_series`:
validate, segment from the baseline seed, track follow-ups from the baseline
mask, measure) on

(a) a reproducible phantom cohort from :mod:`khe_vol.synthetic` (fat-suppressed
    T2, bias up to +-50 %, Rician noise SNR 12-30, 0.5-1 mm in plane and 3-5 mm
    slices, RAS/LPS/sagittal/coronal and oblique grids, repositioning, lesions
    that grow, shrink to a residue or vanish; truth from the continuous shape);
(b) the real scans in ``../shared/realdata/brats2013`` when present.

Prints per series true and measured volume, relative error, Dice and CPU
seconds, then per cohort the median and 90th percentile |volume error|,
median and minimum Dice and month-12 category agreement, and writes the same
as JSON. Usage (from the repository root)::

    python benchmarks/segmentation.py                   # full run
    python benchmarks/segmentation.py --participants 4  # quicker
    python benchmarks/segmentation.py --skip-phantoms   # real scans only
    python benchmarks/segmentation.py --engine hybrid   # the learned engine on the classical mask

The job-cost figure uses /usr/bin/time (Debian package `time`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from khe_vol.synthetic.anatomy import make_anatomy
from khe_vol.synthetic.render import render_series
from khe_vol.synthetic.seeds import phantom_reader_seeds, reader_seeds_ras_mm
from khe_vol.synthetic.specs import SeriesSpec
from khe_vol.response import classify_ratio
from khe_vol.series import measure_series
from khe_vol.segmentation.uncertainty import near_threshold
from khe_vol.overlap import dice
from fractions import Fraction

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata" / "brats2013"

#: Month-12 volume ratios of the phantom cohort, cycled: every category,
#: an 88 % shrinkage and complete involution among them.
M12_RATIOS = (1.45, 0.95, 0.55, 0.12, 0.0, 0.70, 1.30, 0.35, 0.20, 1.05, 0.0, 0.50)
ORIENTATIONS = ("axial_lps", "axial_ras", "sagittal", "coronal")




def phantom_specs(index, rng_seed=2026):
    """Anatomy seed and the three SeriesSpecs of phantom participant ``index``."""
    rng = np.random.default_rng([rng_seed, index])
    m12 = M12_RATIOS[index % len(M12_RATIOS)]
    ratios = {"baseline": 1.0, "m06": 1.0 + (m12 - 1.0) * rng.uniform(0.4, 0.8), "m12": m12}
    specs = {}
    for n, (ses, ratio) in enumerate(ratios.items()):
        in_plane = float(rng.uniform(0.5, 1.0))
        slice_mm = float(rng.uniform(3.0, 5.0))
        fov_mm = np.array([rng.uniform(170, 200), rng.uniform(170, 200), rng.uniform(140, 170)])
        shape = tuple(int(math.ceil(f / v)) for f, v in zip(fov_mm, (in_plane, in_plane, slice_mm)))
        specs[ses] = SeriesSpec(
            shape=shape,
            voxel_mm=(in_plane, in_plane, slice_mm),
            orientation=ORIENTATIONS[(index + n) % len(ORIENTATIONS)],
            oblique_deg=float(rng.uniform(0, 20)),
            oblique_axis=tuple(rng.standard_normal(3)),
            snr=float(rng.uniform(12, 30)),
            bias_amplitude=float(rng.uniform(0.2, 0.5)),
            rotation_deg=tuple(rng.uniform(-6, 6, 3)) if n else (0.0, 0.0, 0.0),
            translation_mm=tuple(rng.uniform(-20, 20, 3)) if n else (0.0, 0.0, 0.0),
            fov_offset_mm=tuple(rng.uniform(-15, 15, 3)),
            volume_ratio=float(ratio),
            rng_seed=int(rng.integers(1 << 31)),
        )
    return int(rng.integers(1 << 31)), specs


def _cpu():
    self_, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + kids.ru_utime + kids.ru_stime


#: Overrides of the segmentation parameters (``--engine``), as a study config's ``segmentation:``.
OVERRIDES = {}


def run_series(tmp, pid, ses, month, image, affine, seed=None, reference=None):
    path = Path(tmp) / f"{pid}_{ses}_T2w.nii.gz"
    img = nib.Nifti1Image(image.astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    t0 = _cpu()
    record, mask, _ = measure_series(pid, ses, month, path, seed_ras_mm=seed, reference=reference,
                                     params_overrides=OVERRIDES or None)
    return record, mask, _cpu() - t0


def category_distance(ratio):
    """Points of percent change from the true change to the nearest threshold."""
    if ratio == 0:
        return math.inf
    change = 100 * (ratio - 1)
    return min(abs(change - t) for t in (20, -20, -75))


def phantom_cohort(n_participants, tmp, log):
    rows, m12 = [], []
    for index in range(n_participants):
        pid = f"sub-ph{index + 1:02d}"
        anatomy_seed, specs = phantom_specs(index)
        anatomy = make_anatomy(anatomy_seed)
        base_record = base_mask = None
        for ses, spec in specs.items():
            month = {"baseline": 0, "m06": 6, "m12": 12}[ses]
            ph = render_series(anatomy, spec)
            if ses == "baseline":  # seeded where a reader clicks, not at the deepest point
                seed = phantom_reader_seeds(anatomy, spec, ph, np.random.default_rng([2026, index, 3]))[0]
                record, mask, cpu = run_series(tmp, pid, f"ses-{ses}", month, ph.image, ph.affine, seed=seed)
                base_record, base_mask = record, mask
            else:
                reference = {"record": base_record, "mask": base_mask}
                record, mask, cpu = run_series(tmp, pid, f"ses-{ses}", month, ph.image, ph.affine, reference=reference)
            row = _row(pid, f"ses-{ses}", ph.true_volume_ml, record, mask, ph.truth_mask, cpu)
            row.update(orientation=spec.orientation, voxel_mm=[round(v, 2) for v in spec.voxel_mm],
                       snr=round(spec.snr, 1), bias=round(spec.bias_amplitude, 2), true_ratio=round(spec.volume_ratio, 4))
            rows.append(row)
            log(row)
            if ses == "m12" and record["status"] == "ok" and base_record["status"] == "ok" and base_record["volume_ml"] > 0:
                true_cat = classify_ratio(Fraction(spec.volume_ratio).limit_denominator(10**6))
                got_cat = classify_ratio(Fraction(record["volume_ml"]) / Fraction(base_record["volume_ml"]))
                near = near_threshold((base_record["volume_low_ml"], base_record["volume_high_ml"]),
                                      (record["volume_low_ml"], record["volume_high_ml"]))
                m12.append({"participant_id": pid, "true_category": true_cat, "measured_category": got_cat,
                            "distance_points": category_distance(spec.volume_ratio), "near_threshold": near})
    return rows, m12


def _row(pid, ses, true_ml, record, mask, truth, cpu):
    ok = record["status"] == "ok"
    measured = record["volume_ml"] if ok else None
    rel = None
    if ok and true_ml > 0:
        rel = (measured - true_ml) / true_ml
    band = (record["volume_low_ml"], record["volume_high_ml"]) if ok else (None, None)
    return {
        "participant_id": pid, "session_id": ses, "true_volume_ml": round(true_ml, 3),
        "measured_volume_ml": None if measured is None else round(measured, 3),
        "relative_error": None if rel is None else round(rel, 4),
        "dice": round(dice(mask, truth), 4) if ok and (mask.any() or truth.any()) else None,
        "volume_low_ml": None if band[0] is None else round(band[0], 3),
        "volume_high_ml": None if band[1] is None else round(band[1], 3),
        "true_in_band": None if band[0] is None else bool(band[0] <= true_ml <= band[1]),
        "cpu_seconds": round(cpu, 2), "status": record["status"], "message": record["message"],
        "classical_ml": ((record.get("details") or {}).get("engines") or {}).get("classical_ml"),
        "engines_disagree": any(r["reason"] == "engines_disagree" for r in record.get("review") or []),
    }


def real_cohort(tmp, log, realdata=REALDATA):
    realdata = Path(realdata)
    if not realdata.is_dir():
        return []
    truth_ml = {r["participant_id"]: float(r["whole_tumour_ml"]) for r in csv.DictReader(open(realdata / "volumes.tsv"), delimiter="\t")}
    rows = []
    for n, pid in enumerate(sorted(truth_ml)):
        image_path = next((realdata / pid).rglob("*_FLAIR.nii.gz"))
        truth = nib.load(next((realdata / "truth" / pid).glob("*_label-wholetumour_mask.nii.gz")))
        # Seeded where a reader clicks (the folder's seeds.tsv holds the deepest
        # point): FLAIR-bright tumour or oedema (expert labels 2-4, not the
        # necrosis, 1), >= 3 mm inside.
        dseg = nib.load(next((realdata / "truth" / pid).glob("*_dseg.nii.gz")))
        bright = np.isin(np.asarray(dseg.dataobj), (2, 3, 4))
        seed = reader_seeds_ras_mm(bright, dseg.affine, np.random.default_rng([2026, n, 3]))[0]
        t0 = _cpu()
        record, mask, _ = measure_series(pid, "ses-baseline", 0, image_path, seed_ras_mm=seed,
                                         params_overrides=OVERRIDES or None)
        row = _row(pid, "ses-baseline", truth_ml[pid], record, mask, np.asarray(truth.dataobj), _cpu() - t0)
        rows.append(row)
        log(row)
    return rows


def summarise(rows, m12=None):
    errs = [abs(r["relative_error"]) for r in rows if r["relative_error"] is not None]
    dices = [r["dice"] for r in rows if r["dice"] is not None and r["true_volume_ml"] > 0]
    out = {
        "n_series": len(rows),
        "n_errors": sum(r["status"] != "ok" for r in rows),
        "median_abs_volume_error_pct": round(100 * float(np.median(errs)), 2) if errs else None,
        "p90_abs_volume_error_pct": round(100 * float(np.percentile(errs, 90)), 2) if errs else None,
        "median_dice": round(float(np.median(dices)), 4) if dices else None,
        "min_dice": round(float(np.min(dices)), 4) if dices else None,
        "median_cpu_seconds": round(float(np.median([r["cpu_seconds"] for r in rows])), 2) if rows else None,
    }
    banded = [r for r in rows if r["true_in_band"] is not None]
    if banded:
        out["true_volume_in_band"] = f"{sum(r['true_in_band'] for r in banded)}/{len(banded)}"
        widths = [(r["volume_high_ml"] - r["volume_low_ml"]) / 2 / r["measured_volume_ml"]
                  for r in banded if r["measured_volume_ml"]]
        out["median_band_half_width_pct"] = round(100 * float(np.median(widths)), 2) if widths else None
    vanished = [r for r in rows if r["true_volume_ml"] == 0]
    if vanished:
        out["vanished_lesions"] = len(vanished)
        out["vanished_measured_zero"] = sum(r["measured_volume_ml"] == 0 for r in vanished)
    if m12 is not None:
        clear = [m for m in m12 if m["distance_points"] >= 5]
        out["m12_category_agreement"] = f"{sum(m['true_category'] == m['measured_category'] for m in clear)}/{len(clear)}"
        out["m12_category_agreement_all"] = f"{sum(m['true_category'] == m['measured_category'] for m in m12)}/{len(m12)}"
        wrong = [m for m in m12 if m["true_category"] != m["measured_category"]]
        out["m12_wrong_categories_flagged_near_threshold"] = f"{sum(m['near_threshold'] for m in wrong)}/{len(wrong)}"
        out["m12_near_threshold"] = f"{sum(m['near_threshold'] for m in m12)}/{len(m12)}"
    return out


def job_cost(tmp):
    """CPU seconds and peak RSS of one `khe-vol series` job on a 320x320x40 T2."""
    anatomy = make_anatomy(7)
    spec = SeriesSpec(shape=(320, 320, 40), voxel_mm=(0.55, 0.55, 4.0), orientation="axial_lps", snr=18,
                              bias_amplitude=0.4, rng_seed=11)
    ph = render_series(anatomy, spec)
    seed = phantom_reader_seeds(anatomy, spec, ph, np.random.default_rng(7))[0]
    path = Path(tmp) / "job_T2w.nii.gz"
    img = nib.Nifti1Image(ph.image, ph.affine)
    img.set_qform(ph.affine, code=1)
    nib.save(img, path)
    cmd = [sys.executable, "-m", "khe_vol.cli", "series", "--participant", "sub-x",
           "--session", "ses-baseline", "--month", "0", "--image", str(path), "--seed", *map(str, seed),
           "--record", str(Path(tmp) / "r.json"), "--mask", str(Path(tmp) / "m.nii.gz")]
    # /usr/bin/time measures the job alone; ru_maxrss of children would also
    # count the pages the job inherited when forked from this large process.
    proc = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", *cmd], capture_output=True, text=True, check=True)
    user, system, max_kb = proc.stderr.strip().splitlines()[-1].split()
    return {"shape": [320, 320, 40], "cpu_seconds": round(float(user) + float(system), 2),
            "peak_rss_mib": round(int(max_kb) / 1024, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=12)
    parser.add_argument("--skip-phantoms", action="store_true")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--skip-job", action="store_true")
    parser.add_argument("--realdata", default=str(REALDATA), help="folder of the real scans (brats2013)")
    parser.add_argument("--out", default="results/benchmark_segmentation.json")
    parser.add_argument("--engine", choices=("classical", "learned", "hybrid"), default="classical",
                        help="segmentation.engine (the automatic path's engine)")
    args = parser.parse_args(argv)
    if args.engine != "classical":
        OVERRIDES["engine"] = args.engine

    def log(row):
        print(f"{row['participant_id']:>12} {row['session_id']:<13} true {row['true_volume_ml']:9.2f} mL  "
              f"measured {row['measured_volume_ml'] if row['measured_volume_ml'] is not None else 'n/a':>9} mL  "
              f"err {('%+.1f%%' % (100 * row['relative_error'])) if row['relative_error'] is not None else 'n/a':>7}  "
              f"Dice {row['dice'] if row['dice'] is not None else 'n/a':>6}  {row['cpu_seconds']:5.1f} s"
              + (f"  {row['message']}" if row["status"] != "ok" else ""), flush=True)

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_phantoms:
            print("== phantoms")
            rows, m12 = phantom_cohort(args.participants, tmp, log)
            result["phantoms"] = {"summary": summarise(rows, m12), "series": rows, "m12": m12}
            print(json.dumps(result["phantoms"]["summary"], indent=2))
        if not args.skip_real:
            print("== real scans (BraTS 2013 FLAIR, whole tumour)")
            rows = real_cohort(tmp, log, args.realdata)
            if rows:
                result["real"] = {"summary": summarise(rows), "series": rows}
                print(json.dumps(result["real"]["summary"], indent=2))
            else:
                print(f"   {args.realdata} not found, skipped")
        if not args.skip_job:
            result["job_320x320x40"] = job_cost(tmp)
            print("== one series job on 320x320x40:", result["job_320x320x40"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
