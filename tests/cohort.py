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
