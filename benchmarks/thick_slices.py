"""Uncertainty band on thick slices: does it hold the true volume?

Renders the six demo participants (:data:`khe_vol.synthetic.demo.DEMO_PLAN`: every
response category, 45-105 mL at baseline) on grids with slices of 6, 8 and
10 mm (in-plane as planned, 0.8-1.0 mm), seeds each baseline as a reader
would (a random bright lesion voxel at least 3 mm inside, not the deepest
point), tracks the follow-ups, and prints per series the true volume, the
measured one and two bands: the calibrated one (a quarter of the boundary
shells, :data:`khe_vol.segmentation.uncertainty.BOUNDARY_FRACTION`) and the one the
workflow writes (:func:`khe_vol.segmentation.uncertainty.boundary_fraction_for`: grows
with slices beyond 5 mm). Then per slice thickness: how many bands hold the
truth, the median band half-width, and how many series are flagged.

Usage (from the repository root)::

    python benchmarks/thick_slices.py                       # 6, 8, 10 mm; ~10 min on 2 cores
    python benchmarks/thick_slices.py --slices 8 --participants 3
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from khe_vol.synthetic.demo import demo_participant, nifti_gz_bytes
from khe_vol.synthetic.render import render_labels, render_series
from khe_vol.synthetic.specs import LESION, LESION_LABELS
from khe_vol.geometry import voxel_sizes_mm, voxel_to_world
from khe_vol.nifti import atomic_write_bytes
from khe_vol.review import series_reasons
from khe_vol.series import measure_series
from khe_vol.segmentation.uncertainty import BOUNDARY_FRACTION, volume_band_ml


def reader_seed(anatomy, spec, affine, rng):
    """A bright lesion voxel at least 3 mm inside the lesion, RAS+ mm."""
    labels = render_labels(anatomy, spec)
    depth = ndimage.distance_transform_edt(np.isin(labels, LESION_LABELS), sampling=voxel_sizes_mm(affine))
    candidates = np.argwhere((labels == LESION) & (depth >= 3))
    return voxel_to_world(candidates[rng.integers(len(candidates))], affine)


def run(slice_mm, participants, tmp, log):
    rows = []
    for index in range(participants):
        anatomy, sessions = demo_participant(index)
        reference = None
        for label, month, spec in sessions:
            spec = replace(spec, voxel_mm=(spec.voxel_mm[0], spec.voxel_mm[1], slice_mm),
                           shape=(spec.shape[0], spec.shape[1], math.ceil(30 * 4.0 / slice_mm) + 2))
            rendered = render_series(anatomy, spec)
            path = Path(tmp) / f"p{index}_{label}_{slice_mm:g}_T2w.nii.gz"
            atomic_write_bytes(path, nifti_gz_bytes(rendered.image, rendered.affine, np.int16, "thick"))
            pid, ses = f"sub-demo{index + 1:02d}", f"ses-{label}"
            if month == 0:
                seed = reader_seed(anatomy, spec, rendered.affine, np.random.default_rng([index, 7]))
                record, mask, _ = measure_series(pid, ses, month, path, seed_ras_mm=seed)
                reference = {"record": record, "mask": mask}
            else:
                record, mask, _ = measure_series(pid, ses, month, path, reference=reference)
            row = {"slice_mm": slice_mm, "participant_id": pid, "session_id": ses,
                   "true_volume_ml": round(rendered.true_volume_ml, 3), "status": record["status"]}
            if record["status"] == "ok":
                calibrated = volume_band_ml(mask, rendered.affine, record["details"].get("threshold_band_ml", ()),
                                            boundary_fraction=BOUNDARY_FRACTION)
                truth = rendered.true_volume_ml
                row.update(
                    volume_ml=round(record["volume_ml"], 3),
                    calibrated_band_ml=[round(v, 3) for v in calibrated],
                    band_ml=[round(record["volume_low_ml"], 3), round(record["volume_high_ml"], 3)],
                    calibrated_holds=bool(calibrated[0] <= truth <= calibrated[1]),
                    band_holds=bool(record["volume_low_ml"] <= truth <= record["volume_high_ml"]),
                    review_reason=[r["reason"] for r in series_reasons(record)],
                )
            else:
                row["message"] = record["message"]
            rows.append(row)
            log(row)
    return rows


def summarise(rows):
    ok = [r for r in rows if r["status"] == "ok"]

    def half_width(band, volume):
        return (band[1] - band[0]) / 2 / volume if volume else None

    widths = {k: [w for w in (half_width(r[k], r["volume_ml"]) for r in ok) if w is not None]
              for k in ("calibrated_band_ml", "band_ml")}
    return {
        "n_series": len(rows),
        "n_errors": len(rows) - len(ok),
        "calibrated_band_holds_truth": f"{sum(r['calibrated_holds'] for r in ok)}/{len(ok)}",
        "band_holds_truth": f"{sum(r['band_holds'] for r in ok)}/{len(ok)}",
        "median_calibrated_half_width_pct": round(100 * float(np.median(widths["calibrated_band_ml"])), 1),
        "median_band_half_width_pct": round(100 * float(np.median(widths["band_ml"])), 1),
        "flagged_thick_slices": f"{sum('thick_slices' in r['review_reason'] for r in ok)}/{len(ok)}",
        "misses": [f"{r['participant_id']} {r['session_id']}: true {r['true_volume_ml']} mL, band {r['band_ml']}"
                   for r in ok if not r["band_holds"]],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", default="6,8,10", help="slice thicknesses, mm (comma-separated)")
    parser.add_argument("--participants", type=int, default=6)
    parser.add_argument("--out", default="results/benchmark_thick_slices.json")
    args = parser.parse_args(argv)

    def log(row):
        if row["status"] != "ok":
            print(f"{row['slice_mm']:4g} mm {row['participant_id']} {row['session_id']:<13} error: {row['message']}")
            return
        print(f"{row['slice_mm']:4g} mm {row['participant_id']} {row['session_id']:<13} true {row['true_volume_ml']:8.2f}"
              f"  measured {row['volume_ml']:8.2f}  calibrated band {row['calibrated_band_ml'][0]:7.2f}-"
              f"{row['calibrated_band_ml'][1]:7.2f} ({'holds' if row['calibrated_holds'] else 'MISSES'})  band "
              f"{row['band_ml'][0]:7.2f}-{row['band_ml'][1]:7.2f} ({'holds' if row['band_holds'] else 'MISSES'})  "
              f"{';'.join(row['review_reason'])}", flush=True)

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for slice_mm in (float(v) for v in args.slices.split(",")):
            rows = run(slice_mm, args.participants, tmp, log)
            result[f"{slice_mm:g}"] = {"summary": summarise(rows), "series": rows}
            print(json.dumps({f"{slice_mm:g} mm": result[f"{slice_mm:g}"]["summary"]}, indent=2), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
