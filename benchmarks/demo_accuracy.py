"""Accuracy of a finished workflow run on the demo cohort against the demo's truth.

Compares ``results/volumes.tsv``, ``results/response.tsv`` and the masks in
``results/derivatives/`` with ``demo/truth.tsv`` and ``demo/truth/`` (written
by ``khe-vol demo demo``). Run after README command 1, from the repository root::

    python benchmarks/demo_accuracy.py [--demo demo] [--results results]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from khe_vol.derivatives import mask_relpath
from khe_vol.overlap import dice


def read_tsv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))




def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="demo")
    parser.add_argument("--results", default="results")
    args = parser.parse_args(argv)
    demo, results = Path(args.demo), Path(args.results)
    truth = {(r["participant_id"], r["session_id"]): r for r in read_tsv(demo / "truth.tsv")}
    rows = []
    for r in read_tsv(results / "volumes.tsv"):
        key = (r["participant_id"], r["session_id"])
        true_ml = float(truth[key]["true_volume_ml"])
        row = {"participant_id": key[0], "session_id": key[1], "true_volume_ml": true_ml, "status": r["status"]}
        if r["status"] == "ok":
            got = float(r["volume_ml"])
            got_mask = np.asarray(nib.load(results / "derivatives" / mask_relpath(*key)).dataobj)
            true_mask = np.asarray(nib.load(demo / "truth" / mask_relpath(*key).with_name(
                f"{key[0]}_{key[1]}_label-lesion_mask.nii.gz")).dataobj)
            row.update(volume_ml=got, relative_error=(got - true_ml) / true_ml if true_ml else None,
                       dice=dice(got_mask, true_mask) if true_ml else None)
        rows.append(row)
        err = row.get("relative_error")
        print(f"{key[0]:>12} {key[1]:<13} true {true_ml:8.2f} mL  measured {row.get('volume_ml', float('nan')):8.2f} mL  "
              f"err {'n/a' if err is None else f'{100 * err:+.1f}%':>7}  Dice {row.get('dice') or float('nan'):.3f}")
    errs = np.array([abs(r["relative_error"]) for r in rows if r.get("relative_error") is not None])
    dices = np.array([r["dice"] for r in rows if r.get("dice") is not None])
    response = read_tsv(results / "response.tsv")
    agree = sum(r["category"] == truth[(r["participant_id"], r["session_id"])]["true_category"] for r in response)
    vanished = [r for r in rows if r["true_volume_ml"] == 0]
    summary = {
        "series": len(rows),
        "errors": sum(r["status"] != "ok" for r in rows),
        "median_abs_volume_error_pct": round(100 * float(np.median(errs)), 2),
        "p90_abs_volume_error_pct": round(100 * float(np.percentile(errs, 90)), 2),
        "max_abs_volume_error_pct": round(100 * float(errs.max()), 2),
        "median_dice": round(float(np.median(dices)), 4),
        "min_dice": round(float(dices.min()), 4),
        "category_agreement": f"{agree}/{len(response)}",
        "vanished_lesions_measured_0": f"{sum(r.get('volume_ml') == 0 for r in vanished)}/{len(vanished)}",
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
