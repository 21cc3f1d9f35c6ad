"""Tiny real cohorts on disk for workflow tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from tests.conftest import make_affine, rotation, save_nifti


def ball_scene(shape, affine, centre_ras_mm, radius_mm, rng):
    """A T2-like image with a bright ball, and the ball's mask, on a grid."""
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    inside = (np.linalg.norm(xyz - centre_ras_mm, axis=1) < radius_mm).reshape(shape)
    image = (100 + 200 * inside + rng.normal(0, 5, shape)).astype(np.float32)
    return image, inside.astype(np.uint8)


def write_mask_cohort(root, radii_mm=None):
    """Participants whose every session has a reader mask (no seeds needed).

    Returns the config path. Participant sub-01: 10 mm ball at baseline, then
    the given radii; sub-02 has its masks stored on a flipped, permuted grid.
    """
    root = Path(root)
    rng = np.random.default_rng(7)
    radii_mm = radii_mm or {"baseline": 10.0, "m06": 8.0, "m12": 0.0}
    shape = (48, 48, 14)
    for pid, flips in (("01", (1, 1, 1)), ("02", (-1, -1, 1))):
        for ses, radius in radii_mm.items():
            aff = make_affine((1.0, 1.0, 3.0), (-24, -24, -21), rot=rotation("z", 8 if pid == "02" else 0), flips=flips)
            if flips[0] < 0:
                aff[:3, 3] = [24, 24, -21]
            image, mask = ball_scene(shape, aff, np.zeros(3), radius, rng)
            base = f"sub-{pid}/ses-{ses}/anat/sub-{pid}_ses-{ses}"
            save_nifti(root / "imaging" / f"{base}_T2w.nii.gz", image, aff)
            if pid == "02":  # stored as (k, i, j) with a flipped k: same physical voxels
                mask = np.flip(np.transpose(mask, (2, 0, 1)), 0)
                perm = np.eye(4)[[1, 2, 0, 3]]  # new index (k, i, j) -> old (i, j, k)
                flip = np.eye(4)
                flip[0, 0], flip[0, 3] = -1, mask.shape[0] - 1
                aff = aff @ perm @ flip
            save_nifti(root / "masks" / f"{base}_label-lesion_mask.nii.gz", mask, aff)
    config = {
        "imaging_dir": str(root / "imaging"),
        "masks_dir": str(root / "masks"),
        "results_dir": str(root / "results"),
        "sessions": {"baseline": 0, "m06": 6, "m12": 12},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


#: The phantom of a seed on a fluid collection (issue 25): a 60 mL lesion with a round fluid
#: collection 19 mm away, on a small grid (the tests' time).
FLUID_AWAY_ANATOMY = {"rng_seed": 7, "lesion_volume_ml": 60.0, "fluid_gap_mm": 19.0}
FLUID_AWAY_SPEC = {"shape": (96, 96, 20), "voxel_mm": (1.2, 1.2, 4.0), "snr": 18.0, "bias_amplitude": 0.3}


def fluid_away_series(volume_ratio=1.0, rng_seed=5):
    """The fluid-collection phantom rendered: (anatomy, spec, series)."""
    from khe_vol.synthetic.anatomy import make_anatomy
    from khe_vol.synthetic.render import render_series
    from khe_vol.synthetic.specs import SeriesSpec

    anatomy = make_anatomy(**FLUID_AWAY_ANATOMY)
    spec = SeriesSpec(**FLUID_AWAY_SPEC, rng_seed=rng_seed, volume_ratio=volume_ratio)
    return anatomy, spec, render_series(anatomy, spec)


def fluid_seeds_ras_mm(anatomy, spec, series, rng, n_seeds=1):
    """Seeds as a reader who mistook the fluid for the lesion places them: anywhere in the fluid, 2 mm inside."""
    from khe_vol.synthetic.render import render_labels
    from khe_vol.synthetic.seeds import reader_seeds_ras_mm
    from khe_vol.synthetic.specs import FLUID

    return reader_seeds_ras_mm(render_labels(anatomy, spec) == FLUID, series.affine, rng, n_seeds, min_depth_mm=2.0)


def add_seed_on_fluid(root, participant="sub-99"):
    """A participant seeded on a fluid collection 19 mm from the lesion, its m12 tracked, its m06 missing.

    Writes the baseline and m12 series, a seeds table with the one seed, and
    adds ``seeds`` to the cohort's config.yaml. Returns the seed (RAS+ mm).
    """
    root = Path(root)
    for ses, ratio, rng_seed in (("baseline", 1.0, 5), ("m12", 0.7, 6)):
        anatomy, spec, series = fluid_away_series(ratio, rng_seed)
        save_nifti(root / f"imaging/{participant}/ses-{ses}/anat/{participant}_ses-{ses}_T2w.nii.gz",
                   np.asarray(series.image, np.float32), series.affine)
        if ses == "baseline":
            seed = fluid_seeds_ras_mm(anatomy, spec, series, np.random.default_rng(1))[0]
    (root / "seeds.tsv").write_text("participant_id\tx\ty\tz\n" + f"{participant}\t" + "\t".join(f"{v:.3f}" for v in seed) + "\n")
    config_path = root / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["seeds"] = str(root / "seeds.tsv")
    config_path.write_text(yaml.safe_dump(config))
    return seed
