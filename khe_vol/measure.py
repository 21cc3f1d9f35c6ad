"""Lesion volume of a mask on its own grid."""

from __future__ import annotations

import numpy as np

from khe_vol.geometry import voxel_volume_mm3


def lesion_volume(mask, affine):
    """Count lesion voxels and convert to millilitres on the mask's native grid.

    Parameters
    ----------
    mask : (I, J, K) array_like
        Non-zero = lesion.
    affine : (4, 4) array_like
        Voxel-to-world affine of the grid, in mm.

    Returns
    -------
    dict
        ``n_voxels`` (int), ``voxel_volume_mm3`` (float, ``|det|`` of the
        affine's 3x3) and ``volume_ml`` (float, n_voxels x voxel volume / 1000).
    """
    n_voxels = int(np.count_nonzero(mask))
    v_mm3 = voxel_volume_mm3(affine)
    return {"n_voxels": n_voxels, "voxel_volume_mm3": v_mm3, "volume_ml": n_voxels * v_mm3 / 1000.0}
