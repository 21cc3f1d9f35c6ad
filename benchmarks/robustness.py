"""Robustness benchmark: is every follow-up category right, or flagged for a reader?

Builds (once, then reused) a variation cohort from :mod:`khe_vol.phantom` and
runs the real workflow (``snakemake``, as ``benchmarks/throughput.py`` does) on
it. Per phantom participant ``sub-rbNN`` (baseline, m06, m12 on 0.7-0.9 mm x
3-4.5 mm grids of several orientations, bias field, noise, repositioning, and
a lesion that grows, shrinks or vanishes):

- **reader-placed seeds**: ``sub-rbNN`` and ``sub-rbNNs2`` ... are the same
  baseline and m12 series (symlinks) seeded at different voxels of bright
  lesion tissue >= 3 mm inside the boundary
  (:func:`khe_vol.phantom.reader_seeds_ras_mm`);
- **rescaled intensities**: ``sub-rbNNa`` (m06 x 2.5 + 300, m12 z-scored),
  ``sub-rbNNb`` (m06 x 0.37 - 200 stored int16 with scl_slope/scl_inter,
  m12 x 0.01 - 3, i.e. negative values), ``sub-rbNNc`` (a z-scored baseline,
  m06 x 30 as raw int16 counts, m12 as rendered);
- **thick slices**: ``sub-rbNNt``, every session rendered anew with 6, 7 and
  8 mm slices.

Then it prints, from the workflow's own ``volumes.tsv`` and ``response.tsv``:

- the spread of the baseline volume over seeds: per participant
  ``(max - min) / median`` in %, and its median and maximum over participants;
  and whether any m12 category depends on the seed;
- for every follow-up (all variants together, then per variant): **right**
  (category = the true category from the phantom's exact volumes), **wrong but
  flagged** (``needs_review`` = 1), **error** (no category, ``status`` error
  with a message: said, not silent) and **wrong and silent** (a wrong
  category with ``needs_review`` = 0).

Targets (issue 11): 0 wrong and silent; >= 90 % right; spread median <= 1.5 %,
max <= 3 %; no category depends on the seed. Usage, from the repository root
(about 10-15 minutes on 2 cores for the default 6 participants)::

    python benchmarks/robustness.py                    # writes results/benchmark_robustness.json
    python benchmarks/robustness.py --participants 2   # a quicker look
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from throughput import workflow_command

from khe_vol import phantom
from khe_vol.nifti import atomic_write_bytes

SESSIONS = (("baseline", 0), ("m06", 6), ("m12", 12))
#: Month-12 volume ratios, cycled: every category and complete involution.
M12_RATIOS = (1.45, 0.95, 0.55, 0.12, 0.0, 0.70, 1.30, 0.35)
ORIENTATIONS = ("axial_lps", "axial_ras", "sagittal")
THICK_SLICES_MM = (6.0, 7.0, 8.0)
#: How each rescaled variant stores its sessions (None = as rendered).
SCALE_VARIANTS = {
    "a": {"m06": "gain_offset", "m12": "zscore"},
    "b": {"m06": "int16_scaled", "m12": "negative"},
    "c": {"baseline": "zscore", "m06": "int16_raw"},
}
#: What each storage does to the rendered intensities I.
STORAGE = {
    "gain_offset": "I x 2.5 + 300, float32",
    "zscore": "(I - mean) / sd over the image, float32",
    "int16_scaled": "I x 0.37 - 200, int16 with scl_slope / scl_inter",
    "negative": "I x 0.01 - 3, float32 (about half the voxels negative)",
    "int16_raw": "I x 30 as raw int16 counts (no scaling)",
}
COHORT_VERSION = 1


def participant_specs(index, rng_seed=2027):
    """Anatomy and ``{session: SeriesSpec}`` (plus thick-slice specs) of participant ``index``."""
    rng = np.random.default_rng([rng_seed, index])
    m12 = M12_RATIOS[index % len(M12_RATIOS)]
    ratios = {"baseline": 1.0, "m06": 1.0 + (m12 - 1.0) * float(rng.uniform(0.4, 0.7)), "m12": m12}
    for _attempt in range(20):
        anatomy = phantom.make_anatomy(int(rng.integers(1 << 31)))
        specs, thick = {}, {}
        for n, (ses, ratio) in enumerate(ratios.items()):
            in_plane = float(rng.uniform(0.7, 0.9))
            slice_mm = float(rng.uniform(3.0, 4.5))
            fov_mm = np.array([rng.uniform(180, 200), rng.uniform(180, 200), rng.uniform(130, 150)])
            common = dict(
                orientation=ORIENTATIONS[(index + n) % len(ORIENTATIONS)],
                oblique_deg=float(rng.uniform(0, 15)), oblique_axis=tuple(rng.standard_normal(3)),
                snr=float(rng.uniform(12, 25)), bias_amplitude=float(rng.uniform(0.2, 0.4)),
                rotation_deg=tuple(rng.uniform(-5, 5, 3)) if n else (0.0, 0.0, 0.0),
                translation_mm=tuple(rng.uniform(-15, 15, 3)) if n else (0.0, 0.0, 0.0),
                fov_offset_mm=tuple(rng.uniform(-10, 10, 3)), volume_ratio=float(ratio),
            )
            specs[ses] = phantom.SeriesSpec(
                shape=tuple(int(math.ceil(f / v)) for f, v in zip(fov_mm, (in_plane, in_plane, slice_mm))),
                voxel_mm=(in_plane, in_plane, slice_mm), rng_seed=int(rng.integers(1 << 31)), **common)
            thick_mm = THICK_SLICES_MM[n]
            thick[ses] = phantom.SeriesSpec(
                shape=tuple(int(math.ceil(f / v)) for f, v in zip(fov_mm, (in_plane, in_plane, thick_mm))),
                voxel_mm=(in_plane, in_plane, thick_mm), rng_seed=int(rng.integers(1 << 31)), **common)
        if all(phantom.lesion_fits_fov(anatomy, s) for s in (*specs.values(), *thick.values())):
            return anatomy, specs, thick
    raise RuntimeError(f"participant {index}: the lesion does not fit the field of view")


def stored(image, storage):
    """``(data, dtype)`` to write for a rendered image under one :data:`STORAGE` kind."""
    image = np.asarray(image, np.float32)
    if storage is None:
        return image, np.float32
    if storage == "gain_offset":
        return image * np.float32(2.5) + np.float32(300), np.float32
    if storage == "zscore":
        return ((image - image.mean(dtype=np.float64)) / image.std(dtype=np.float64)).astype(np.float32), np.float32
    if storage == "int16_scaled":  # nibabel picks scl_slope and scl_inter to hold the range
        return image * np.float32(0.37) - np.float32(200), np.int16
    if storage == "negative":
        return image * np.float32(0.01) - np.float32(3), np.float32
    if storage == "int16_raw":
        return np.clip(np.rint(image * 30), -32768, 32767).astype(np.int16), np.int16
    raise ValueError(f"unknown storage {storage!r}")


def write_series(path, image, affine, storage=None):
    data, dtype = stored(image, storage)
    atomic_write_bytes(path, phantom.nifti_gz_bytes(data, affine, dtype, f"khe-vol robustness {storage or 'rendered'}"))


def series_path(root, pid, ses):
    return Path(root) / "imaging" / pid / f"ses-{ses}" / "anat" / f"{pid}_ses-{ses}_T2w.nii.gz"


def link(src, dst):
    """``dst`` as a relative symlink to ``src`` (the same bytes, no copy)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    os.symlink(os.path.relpath(src, dst.parent), dst)


def _write_participant(job):
    """Every series of one phantom participant and its variants; returns seeds and truth rows."""
    index, out, n_seeds = job
    out = Path(out)
    pid = f"sub-rb{index + 1:02d}"
    anatomy, specs, thick = participant_specs(index)
    rng = np.random.default_rng([2027, index, 3])
    seeds, truth = {}, []
    rendered = {}
    for ses, spec in specs.items():
        ph = phantom.render_series(anatomy, spec)
        rendered[ses] = ph
        write_series(series_path(out, pid, ses), ph.image, ph.affine)
    base = rendered["baseline"]
    reader = phantom.phantom_reader_seeds(anatomy, specs["baseline"], base, rng, n_seeds)
    seeds[pid] = reader[0]
    for k in range(1, n_seeds):  # the same series, seeded elsewhere
        vid = f"{pid}s{k + 1}"
        seeds[vid] = reader[k]
        for ses in ("baseline", "m12"):
            link(series_path(out, pid, ses), series_path(out, vid, ses))
    for key, storage in SCALE_VARIANTS.items():
        vid = f"{pid}{key}"
        seeds[vid] = reader[0]
        for ses, ph in rendered.items():
            if storage.get(ses):
                write_series(series_path(out, vid, ses), ph.image, ph.affine, storage[ses])
            else:
                link(series_path(out, pid, ses), series_path(out, vid, ses))
    vid = f"{pid}t"
    for ses, spec in thick.items():
        ph = phantom.render_series(anatomy, spec)
        write_series(series_path(out, vid, ses), ph.image, ph.affine)
        if ses == "baseline":
            seeds[vid] = phantom.phantom_reader_seeds(anatomy, spec, ph, rng)[0]
    for ses, spec in specs.items():
        truth.append({"participant": pid, "session_id": f"ses-{ses}", "volume_ratio": spec.volume_ratio,
                      "true_volume_ml": spec.volume_ratio * anatomy.baseline_volume_ml,
                      "true_category": "n/a" if ses == "baseline" else phantom.true_category(spec.volume_ratio)})
    return {vid: [float(v) for v in xyz] for vid, xyz in seeds.items()}, truth


def make_cohort(out, n_participants, n_seeds, cores):
    """Write the cohort (images, seeds.tsv, truth.json) unless the same one is already there."""
    out = Path(out)
    stamp = out / "cohort.json"
    spec = {"participants": n_participants, "seeds": n_seeds, "version": COHORT_VERSION}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with ProcessPoolExecutor(cores) as pool:
        parts = list(pool.map(_write_participant, [(i, str(out), n_seeds) for i in range(n_participants)]))
    rows = ["participant_id\tx\ty\tz"]
    truth = []
    for seeds, t in parts:
        rows += [f"{vid}\t" + "\t".join(f"{v:.2f}" for v in xyz) for vid, xyz in seeds.items()]
        truth += t
    (out / "seeds.tsv").write_text("\n".join(rows) + "\n")
    (out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    stamp.write_text(json.dumps(spec))
    return out


def read_tsv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def variant_of(vid, base):
    """Variation a pseudo-participant id stands for."""
    suffix = vid[len(base):]
    if suffix == "" or suffix.startswith("s"):
        return "seeds"
    return {"t": "thick_slices", **{k: f"rescaled_{k}" for k in SCALE_VARIANTS}}[suffix]


def score(results, truth, n_participants):
    """Spread over seeds, seed-dependent categories, and right / flagged / error / silent counts."""
    true = {(t["participant"], t["session_id"]): t for t in truth}
    volumes = read_tsv(Path(results) / "volumes.tsv")
    response = read_tsv(Path(results) / "response.tsv")
    bases = [f"sub-rb{i + 1:02d}" for i in range(n_participants)]

    def base_of(vid):
        return next(b for b in bases if vid.startswith(b))

    spread = {}
    for b in bases:
        v = [float(r["volume_ml"]) for r in volumes if r["session_id"] == "ses-baseline"
             and base_of(r["participant_id"]) == b and variant_of(r["participant_id"], b) == "seeds"
             and r["status"] == "ok" and r["volume_ml"] not in ("", "n/a")]
        failed = sum(1 for r in volumes if r["session_id"] == "ses-baseline" and base_of(r["participant_id"]) == b
                     and variant_of(r["participant_id"], b) == "seeds" and r["status"] != "ok")
        spread[b] = {"volumes_ml": v, "failed": failed,
                     "spread_pct": 100 * (max(v) - min(v)) / float(np.median(v)) if v and np.median(v) > 0 else None,
                     "true_volume_ml": true[(b, "ses-baseline")]["true_volume_ml"]}
    seed_categories = {}
    rows = []
    for r in response:
        vid = r["participant_id"]
        b = base_of(vid)
        t = true[(b, r["session_id"])]
        variant = variant_of(vid, b)
        if r["status"] != "ok" or r["category"] in ("", "n/a"):
            outcome = "error"
        elif r["category"] == t["true_category"]:
            outcome = "right"
        elif r.get("needs_review") == "1":
            outcome = "wrong_flagged"
        else:
            outcome = "wrong_silent"
        rows.append({"participant_id": vid, "session_id": r["session_id"], "variant": variant,
                     "true_category": t["true_category"], "category": r["category"],
                     "percent_change": r["percent_change"], "true_percent_change": round(100 * (t["volume_ratio"] - 1), 2),
                     "needs_review": r.get("needs_review"), "review_reason": r.get("review_reason"),
                     "status": r["status"], "outcome": outcome, "message": r.get("message")})
        if variant == "seeds":
            seed_categories.setdefault((b, r["session_id"]), set()).add(r["category"])
    outcomes = ("right", "wrong_flagged", "error", "wrong_silent")

    def counts(sel):
        c = {o: sum(r["outcome"] == o for r in sel) for o in outcomes}
        c["total"] = len(sel)
        c["right_flagged"] = sum(r["outcome"] == "right" and r["needs_review"] == "1" for r in sel)
        return c

    by_variant = {v: counts([r for r in rows if r["variant"] == v])
                  for v in ("seeds", "rescaled_a", "rescaled_b", "rescaled_c", "thick_slices")}
    spreads = [s["spread_pct"] for s in spread.values() if s["spread_pct"] is not None]
    total = counts(rows)
    summary = {
        "participants": n_participants,
        "follow_ups": total["total"],
        "right": total["right"],
        "right_pct": round(100 * total["right"] / max(total["total"], 1), 1),
        "wrong_but_flagged": total["wrong_flagged"],
        "error_no_category": total["error"],
        "wrong_and_silent": total["wrong_silent"],
        "right_but_flagged": total["right_flagged"],
        "seed_spread_median_pct": round(float(np.median(spreads)), 2) if spreads else None,
        "seed_spread_max_pct": round(float(np.max(spreads)), 2) if spreads else None,
        "seed_baselines_failed": sum(s["failed"] for s in spread.values()),
        "categories_depending_on_seed": sorted(f"{b} {ses}: {sorted(c)}" for (b, ses), c in seed_categories.items()
                                               if len(c) > 1),
    }
    summary["targets_met"] = {
        "no_wrong_and_silent": summary["wrong_and_silent"] == 0,
        "right_at_least_90_pct": summary["right_pct"] >= 90,
        "seed_spread_median_at_most_1.5_pct": spreads != [] and summary["seed_spread_median_pct"] <= 1.5,
        "seed_spread_max_at_most_3_pct": spreads != [] and summary["seed_spread_max_pct"] <= 3,
        "no_category_depends_on_seed": not summary["categories_depending_on_seed"],
    }
    return {"summary": summary, "by_variant": by_variant, "seed_spread": spread, "follow_ups": rows,
            "storage": STORAGE, "scale_variants": SCALE_VARIANTS, "thick_slices_mm": THICK_SLICES_MM}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=5, help="reader seeds per participant")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--work", default="results/robustness", help="cohort and run folder")
    parser.add_argument("--out", default="results/benchmark_robustness.json")
    args = parser.parse_args(argv)

    work = Path(args.work).resolve()
    print(f"== cohort: {args.participants} participants, {args.seeds} reader seeds each, rescaled and "
          f"thick-slice variants", flush=True)
    t0 = time.perf_counter()
    cohort = make_cohort(work / "cohort", args.participants, args.seeds, args.cores)
    print(f"   ready in {time.perf_counter() - t0:.0f} s (reused when already there)", flush=True)
    truth = json.loads((cohort / "truth.json").read_text())

    results = work / "results"
    cmd = workflow_command(work, cohort, results, args.cores, SESSIONS)
    n_series = sum(1 for _ in (cohort / "imaging").glob("sub-*/ses-*/anat/*_T2w.nii.gz"))
    print(f"== snakemake --cores {args.cores} on {n_series} series", flush=True)
    t0 = time.perf_counter()
    with open(work / "snakemake.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall_s = time.perf_counter() - t0
    if proc.returncode:
        print((work / "snakemake.log").read_text()[-3000:])
        return 1
    print(f"   {wall_s / 60:.1f} min", flush=True)

    result = score(results, truth, args.participants)
    result["summary"]["series"] = n_series
    result["summary"]["workflow_wall_min"] = round(wall_s / 60, 2)
    print("== baseline volume over reader seeds (same series, seed moved)")
    for b, s in result["seed_spread"].items():
        vols = " ".join(f"{v:.2f}" for v in s["volumes_ml"])
        spread = "n/a" if s["spread_pct"] is None else f"{s['spread_pct']:.2f}%"
        print(f"   {b}: true {s['true_volume_ml']:.2f} mL, measured {vols} mL, spread {spread}"
              + (f", {s['failed']} failed" if s["failed"] else ""))
    print("== follow-ups: right / wrong but flagged / error (said why) / wrong and silent")
    for variant, c in result["by_variant"].items():
        print(f"   {variant:<13} {c['right']:3d} / {c['wrong_flagged']:3d} / {c['error']:3d} / {c['wrong_silent']:3d}"
              f"   of {c['total']} (right but flagged: {c['right_flagged']})")
    for r in result["follow_ups"]:
        if r["outcome"] != "right":
            print(f"   {r['outcome']:<13} {r['participant_id']} {r['session_id']}: {r['category']} "
                  f"({r['percent_change']} %) vs true {r['true_category']} ({r['true_percent_change']} %); "
                  f"review {r['review_reason']}" + (f"; {r['message']}" if r["message"] not in (None, "", "n/a") else ""))
    print(json.dumps(result["summary"], indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
