"""Interactive segmentation benchmark: clicks a simulated reader needs to reach a target.

The standard simulated-reader protocol of interactive segmentation: start
from the automatic mask (the seeded baseline, the tracked follow-up), or,
where there is none, from one include click at the lesion's interior-most
point; each next click goes to the interior-most point (largest distance to
its own border, mm) of the largest error region, include for missed lesion,
exclude for false lesion; at most 10 clicks. Clicks go through
:class:`khe_vol.segmentation.interactive.ClickSession`, the object the reader
app's segment endpoint keeps per case.

Cohorts: the phantom variation cohort of ``benchmarks/segmentation.py``
(baselines seeded where a reader clicks, follow-ups tracked) and the real
scans in ``../shared/realdata/brats2013`` when present (whole tumour, seeded
in FLAIR-bright tumour).

Prints per series the Dice and volume error after 0, 1, 3, 5 and 10 clicks,
the clicks needed to reach Dice 0.90 and 0.95 (NoC@90, NoC@95; 11 = not
reached), and CPU seconds per click (p50/p90; the first click, which
prepares the image and segments from the seed or the start mask, apart; the
app's endpoint adds little, see ``benchmarks/segment_endpoint.py``); writes
the same to ``results/benchmark_interactive.json``. Vanished lesions (no
truth) are listed apart: their target is an empty mask. Usage, from the
repository root::

    python benchmarks/interactive.py                    # 8 phantom participants + real scans
    python benchmarks/interactive.py --participants 3 --skip-real
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from khe_vol.geometry import voxel_sizes_mm, voxel_to_world
from khe_vol.overlap import dice
from khe_vol.segmentation.interactive import EXCLUDE, INCLUDE, Click, ClickSession
from khe_vol.segmentation.learned import segment_box
from khe_vol.segmentation.params import SegmentationError
from khe_vol.segmentation.seeded import segment_from_seed
from khe_vol.segmentation.track import track_followup
from khe_vol.synthetic.anatomy import make_anatomy
from khe_vol.synthetic.render import render_series
from khe_vol.synthetic.seeds import phantom_reader_seeds, reader_seeds_ras_mm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segmentation import REALDATA, phantom_specs  # noqa: E402  (the same phantom cohort)

REPO = Path(__file__).resolve().parents[1]
MAX_CLICKS = 10
REPORT_AFTER = (0, 1, 3, 5, 10)


def interior_most(region, spacing_mm):
    """Voxel of ``region`` farthest from its border, mm (ties: first in C order)."""
    depth = ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing_mm)[1:-1, 1:-1, 1:-1]
    return np.unravel_index(int(np.argmax(depth)), region.shape)


def next_click(mask, truth, affine):
    """The simulated reader's next click: the interior-most point of the largest error region.

    Returns
    -------
    Click or None
        None when there is no error left.
    """
    best = None
    for kind, error in ((INCLUDE, truth & ~mask), (EXCLUDE, mask & ~truth)):
        labels, n = ndimage.label(error)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), kind, labels == k + 1)
    if best is None:
        return None
    ijk = interior_most(best[2], voxel_sizes_mm(affine))
    return Click(best[1], tuple(float(v) for v in voxel_to_world(ijk, affine)))


def truth_box_ras_mm(truth, affine):
    """The simulated reader's box: the truth's 3D bounding box (voxel centres), RAS+ mm corners."""
    idx = np.argwhere(np.asarray(truth) != 0)
    corners = voxel_to_world(np.array([idx.min(axis=0), idx.max(axis=0)]), affine)
    return [float(v) for v in (*corners[0], *corners[1])]


def simulate(image, affine, truth, start_mask=None, seed_click=None, box=False):
    """Run the protocol on one series.

    With ``box``, the learned engine's protocol: interaction 0 is the
    automatic (seeded or tracked) mask as before, interaction 1 the truth's
    3D box through :func:`khe_vol.segmentation.learned.segment_box`, and
    the clicks then steer the box's mask.

    Returns
    -------
    dict
        Dice and volume error after each click, NoC@90/95, seconds per click.
    """
    truth = np.asarray(truth) != 0
    voxel_ml = abs(np.linalg.det(np.asarray(affine)[:3, :3])) / 1000.0
    true_ml = float(truth.sum()) * voxel_ml
    dices, errors, seconds, kinds = [], [], [], []
    if box:
        auto = start_mask if start_mask is not None else segment_from_seed(image, affine, seed_click.ras_mm)[0] != 0
        dices.append(dice(auto, truth))
        errors.append((float(auto.sum()) * voxel_ml - true_ml) / true_ml)
        t0 = time.process_time()
        start_mask = segment_box(image, affine, truth_box_ras_mm(truth, affine))[0] != 0
        seconds.append(time.process_time() - t0)
        kinds.append("box")
        if not start_mask.any():
            return {"error": "the box gave an empty mask"}
    session = ClickSession(image, affine, start_mask=start_mask)
    clicks = [] if start_mask is not None else [seed_click]
    mask = start_mask if start_mask is not None else None
    first = len(dices)  # 1 after a box: it was interaction 1
    for n in range(first, MAX_CLICKS + 1):
        if n > first or start_mask is None:
            t0 = time.process_time()
            try:
                mask, _ = session.segment(clicks)
            except SegmentationError as exc:
                return {"error": str(exc), "clicks": [c.as_dict() for c in clicks]}
            seconds.append(time.process_time() - t0)  # the first: preparation and seed
        mask = np.asarray(mask) != 0
        dices.append(dice(mask, truth) if (mask.any() or truth.any()) else 1.0)
        errors.append((float(mask.sum()) * voxel_ml - true_ml) / true_ml if true_ml else float(mask.sum()) * voxel_ml)
        click = next_click(mask, truth, affine)
        if click is None or n == MAX_CLICKS:
            break
        clicks.append(click)
        kinds.append(click.kind)
    while len(dices) <= MAX_CLICKS:  # no error left: stays there
        dices.append(dices[-1])
        errors.append(errors[-1])

    def noc(target):
        return next((k for k, d in enumerate(dices) if d >= target), MAX_CLICKS + 1)

    return {
        "true_volume_ml": round(true_ml, 3),
        "dice": {k: round(dices[k], 4) for k in REPORT_AFTER},
        "volume_error": {k: round(errors[k], 4) for k in REPORT_AFTER},
        "noc90": noc(0.90), "noc95": noc(0.95),
        "click_kinds": kinds, "first_click_seconds": round(seconds[0], 3),
        "click_seconds": [round(s, 3) for s in seconds[1:]],
    }


def phantom_rows(n_participants, log, box=False):
    rows = []
    for index in range(n_participants):
        pid = f"sub-ph{index + 1:02d}"
        anatomy_seed, specs = phantom_specs(index)
        anatomy = make_anatomy(anatomy_seed)
        base = None
        for ses, spec in specs.items():
            ph = render_series(anatomy, spec)
            row = {"cohort": "phantom", "participant_id": pid, "session_id": f"ses-{ses}"}
            if ses == "baseline":  # seeded where a reader clicks
                seed = phantom_reader_seeds(anatomy, spec, ph, np.random.default_rng([2026, index, 3]))[0]
                result = simulate(ph.image, ph.affine, ph.truth_mask, seed_click=Click(INCLUDE, tuple(seed)), box=box)
                base = segment_from_seed(ph.image, ph.affine, seed)[0], ph
            else:
                tracked, _ = track_followup(ph.image, ph.affine, base[1].image, base[1].affine, base[0])
                if tracked.any():
                    result = simulate(ph.image, ph.affine, ph.truth_mask, start_mask=tracked, box=box)
                elif ph.truth_mask.any():  # nothing found: one click at the interior-most point
                    ijk = interior_most(ph.truth_mask != 0, voxel_sizes_mm(ph.affine))
                    seed = Click(INCLUDE, tuple(float(v) for v in voxel_to_world(ijk, ph.affine)))
                    result = simulate(ph.image, ph.affine, ph.truth_mask, seed_click=seed)
                else:
                    result = {"true_volume_ml": 0.0, "vanished_and_empty": True}
            row.update(result)
            rows.append(row)
            log(row)
    return rows


def real_rows(realdata, log, box=False):
    realdata = Path(realdata)
    if not realdata.is_dir():
        return []
    rows = []
    pids = sorted(p.name for p in realdata.glob("sub-*"))
    for n, pid in enumerate(pids):
        img = nib.load(next((realdata / pid).rglob("*_FLAIR.nii.gz")))
        truth = np.asarray(nib.load(next((realdata / "truth" / pid).glob("*_label-wholetumour_mask.nii.gz"))).dataobj)
        dseg = nib.load(next((realdata / "truth" / pid).glob("*_dseg.nii.gz")))
        bright = np.isin(np.asarray(dseg.dataobj), (2, 3, 4))  # FLAIR-bright tumour and oedema, as a reader seeds
        seed = reader_seeds_ras_mm(bright, dseg.affine, np.random.default_rng([2026, n, 3]))[0]
        image = np.asarray(img.dataobj, np.float32)
        result = simulate(image, img.affine, truth, seed_click=Click(INCLUDE, tuple(seed)), box=box)
        row = {"cohort": "real", "participant_id": pid, "session_id": "ses-baseline", **result}
        rows.append(row)
        log(row)
    return rows


def summarise(rows):
    scored = [r for r in rows if "noc95" in r and r["true_volume_ml"] > 0]
    if not scored:
        return {"n_series": len(rows)}
    refine = [s for r in scored for s in r["click_seconds"]]
    first = [r["first_click_seconds"] for r in scored if "first_click_seconds" in r]
    out = {
        "n_series": len(rows), "n_scored": len(scored),
        "n_errors": sum("error" in r for r in rows),
        "mean_noc90": round(float(np.mean([r["noc90"] for r in scored])), 2),
        "mean_noc95": round(float(np.mean([r["noc95"] for r in scored])), 2),
        "max_noc95": int(max(r["noc95"] for r in scored)),
        "mean_dice": {k: round(float(np.mean([r["dice"][k] for r in scored])), 4) for k in REPORT_AFTER},
        "min_dice": {k: round(float(np.min([r["dice"][k] for r in scored])), 4) for k in REPORT_AFTER},
        "dice_ge_090_within_5": f"{sum(r['dice'][5] >= 0.90 for r in scored)}/{len(scored)}",
        # Do clicks ever make it worse? The largest fall below the starting Dice after 1-10 clicks.
        "worst_dice_fall": round(float(max(r["dice"][0] - min(r["dice"][k] for k in REPORT_AFTER) for r in scored)), 4),
        "refine_click_seconds_p50": round(float(np.percentile(refine, 50)), 3) if refine else None,
        "refine_click_seconds_p90": round(float(np.percentile(refine, 90)), 3) if refine else None,
        "first_click_seconds_p50": round(float(np.percentile(first, 50)), 3) if first else None,
        "first_click_seconds_p90": round(float(np.percentile(first, 90)), 3) if first else None,
    }
    vanished = [r for r in rows if r.get("true_volume_ml") == 0]
    if vanished:
        out["vanished"] = len(vanished)
    return out


def _log(row):
    if "noc95" in row:
        print(f"{row['cohort']:8s} {row['participant_id']} {row['session_id']:13s} "
              f"Dice 0/1/3/5/10: {'/'.join(format(row['dice'][k], '.3f') for k in REPORT_AFTER)}  "
              f"NoC@90 {row['noc90']:2d} NoC@95 {row['noc95']:2d}  clicks {''.join(k[0] for k in row['click_kinds'])}",
              flush=True)
    else:
        print(f"{row['cohort']:8s} {row['participant_id']} {row['session_id']:13s} {row.get('error', 'vanished, empty')}",
              flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", type=int, default=8)
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--skip-phantoms", action="store_true")
    parser.add_argument("--realdata", default=str(REALDATA))
    parser.add_argument("--box", action="store_true",
                        help="the learned engine's protocol: interaction 1 is the truth's 3D box, then clicks")
    parser.add_argument("--out", default=str(REPO / "results" / "benchmark_interactive.json"))
    args = parser.parse_args(argv)
    phantoms = [] if args.skip_phantoms else phantom_rows(args.participants, _log, args.box)
    real = [] if args.skip_real else real_rows(args.realdata, _log, args.box)
    summary = {"phantom": summarise(phantoms), "real": summarise(real) if real else None}
    print(json.dumps(summary, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "series": phantoms + real}, indent=2, default=str) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
