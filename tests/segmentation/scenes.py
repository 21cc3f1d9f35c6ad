"""Small synthetic scenes (arrays + spacing) for the segmentation unit tests."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from khe_vol.overlap import dice
from scipy import ndimage

SPACING_MM = np.array([0.8, 0.8, 3.0])
SHAPE = (64, 64, 16)
TISSUE, LESION, FLUID, FAT = 200.0, 400.0, 900.0, 20.0


def ball(center_mm, radius_mm, shape=SHAPE, spacing_mm=SPACING_MM):
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g * s - c) ** 2 for g, s, c in zip(grids, spacing_mm, center_mm)) <= radius_mm**2


def scene(cyst="beside", seed=0):
    """Tissue with a fat slab, a 12 mm lesion and a flat fluid cyst beside it or inside it.

    Returns smoothed-like intensities, the true lesion and the true cyst.
    """
    rng = np.random.default_rng(seed)
    centre = np.array([25.6, 25.6, 24.0])
    lesion = ball(centre, 12.0)
    fluid = ball(centre + [17.0, 0, 0], 5.0) if cyst == "beside" else ball(centre, 4.0)
    image = np.full(SHAPE, TISSUE)
    image[:, 56:] = FAT
    image[lesion] = LESION
    image[fluid] = FLUID
    image = ndimage.gaussian_filter(image, 0.6 / (SPACING_MM / SPACING_MM.min()))
    image += rng.normal(0, 6.0, SHAPE)  # lesion heterogeneity and noise, smoothed data
    return image.astype(np.float32), lesion & ~fluid if cyst == "beside" else lesion, fluid




def ras_text(values):
    """RAS+ mm numbers as a command-line argument (``X,Y,Z``; a box's six corners)."""
    return ",".join(f"{v:.3f}" for v in values)


def segment_cli(image_path, tmp_path, *args, name="mask.nii.gz"):
    """``khe-vol segment --image image_path ... --out tmp_path/name`` as a user runs it: (process, out)."""
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", "khe_vol.cli", "segment", "--image", str(image_path), *args,
                           "--out", str(out)], capture_output=True, text=True)
    return proc, out
