"""How often ``seed_on_fluid`` is raised: seeds in the fluid collection (hits) and reader seeds in the lesion
(false alarms), on synthetic phantoms, through the per-series job (:func:`khe_vol.series.measure_series`).

Each phantom (``make_anatomy(n)``, a fluid collection touching the lesion) is measured from one seed
anywhere in its fluid (2 mm inside) and one reader seed in bright lesion tissue. Run from the
repository root (printed, never asserted)::

    python benchmarks/seed_on_fluid.py [--phantoms 16]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from khe_vol.series import measure_series
from khe_vol.synthetic.anatomy import make_anatomy
from khe_vol.synthetic.render import render_labels, render_series
from khe_vol.synthetic.seeds import phantom_reader_seeds, reader_seeds_ras_mm
from khe_vol.synthetic.specs import FLUID, SeriesSpec

SPEC = SeriesSpec(shape=(128, 128, 26), voxel_mm=(0.9, 0.9, 4.0), snr=18.0, bias_amplitude=0.3, rng_seed=5)


def _flagged(record):
    return "seed_on_fluid" in {item["reason"] for item in record["review"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=16)
    args = parser.parse_args()
    hits = alarms = 0
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.phantoms):
            anatomy = make_anatomy(n)
            series = render_series(anatomy, SPEC)
            path = Path(tmp) / f"sub-{n:02d}_ses-baseline_T2w.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(series.image, np.float32), series.affine), path)
            lesion_seed = phantom_reader_seeds(anatomy, SPEC, series, np.random.default_rng(n))[0]
            fluid_seed = reader_seeds_ras_mm(render_labels(anatomy, SPEC) == FLUID, series.affine,
                                             np.random.default_rng(n), 1, min_depth_mm=2.0)[0]
            lesion = measure_series("sub-01", "ses-baseline", 0, path, seed_ras_mm=lesion_seed)[0]
            fluid = measure_series("sub-01", "ses-baseline", 0, path, seed_ras_mm=fluid_seed)[0]
            alarms += _flagged(lesion)
            hits += _flagged(fluid)
            print(f"phantom {n:2d}: lesion {series.true_volume_ml:6.1f} mL; reader seed {lesion['volume_ml']:6.1f} mL "
                  f"flagged {_flagged(lesion)}; fluid seed {fluid['volume_ml']:6.1f} mL flagged {_flagged(fluid)}",
                  flush=True)
    print(f"seeds in the fluid flagged seed_on_fluid: {hits}/{args.phantoms}; "
          f"reader seeds in the lesion flagged: {alarms}/{args.phantoms}")


if __name__ == "__main__":
    main()
