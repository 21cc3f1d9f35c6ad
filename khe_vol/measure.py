"""Lesion volume and size of a mask on its own grid."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist
from skimage.measure import marching_cubes

from khe_vol.geometry import voxel_to_world, voxel_volume_mm3


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


def lesion_surface(mask, affine):
    """Surface mesh of a mask in world coordinates (marching cubes at 0.5).

    Returns
    -------
    vertices_ras_mm : (V, 3) ndarray
    faces : (F, 3) ndarray of int
        Empty arrays for an empty mask.
    """
    mask = np.asarray(mask) != 0
    if not mask.any():
        return np.empty((0, 3)), np.empty((0, 3), dtype=int)
    nz = np.nonzero(mask)
    lo = np.array([a.min() for a in nz])
    hi = np.array([a.max() for a in nz]) + 1
    # One voxel of background around the crop closes the surface at the box.
    crop = np.pad(mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], 1).astype(np.float32)
    verts, faces, _, _ = marching_cubes(crop, level=0.5)
    return voxel_to_world(verts + lo - 1, affine), faces


def mesh_volume_ml(vertices_ras_mm, faces):
    """Enclosed volume of a closed triangle mesh (divergence theorem), in mL."""
    if len(faces) == 0:
        return 0.0
    v0, v1, v2 = (vertices_ras_mm[faces[:, i]] for i in range(3))
    return float(abs(np.einsum("ij,ij->i", v0, np.cross(v1, v2)).sum()) / 6.0 / 1000.0)


def max_diameter_cm(vertices_ras_mm):
    """Largest distance between two points of the lesion surface, in cm.

    This is the maximal 3D tumour dimension (the trial's Table 1 measure),
    taken between surface points halfway between lesion and background
    voxel centres.
    """
    pts = np.asarray(vertices_ras_mm, dtype=float)
    if len(pts) < 2:
        return 0.0
    try:
        pts = pts[ConvexHull(pts).vertices]  # the farthest pair lies on the hull
    except QhullError:  # flat or degenerate surface: use every point
        pass
    return float(pdist(pts).max() / 10.0)


def lesion_size(mask, affine):
    """Voxel volume, surface-mesh volume and maximal 3D diameter of a lesion.

    Parameters
    ----------
    mask : (I, J, K) array_like
        Non-zero = lesion.
    affine : (4, 4) array_like
        Voxel-to-world affine, in mm.

    Returns
    -------
    dict
        :func:`lesion_volume`'s keys plus ``mesh_volume_ml`` (a cross-check
        of the voxel volume; smaller for thin or jagged lesions) and
        ``max_diameter_cm``.
    """
    out = lesion_volume(mask, affine)
    verts, faces = lesion_surface(mask, affine)
    out["mesh_volume_ml"] = mesh_volume_ml(verts, faces)
    out["max_diameter_cm"] = max_diameter_cm(verts)
    return out


def boundary_shells_ml(mask, affine):
    """Volumes of the one-voxel shells just inside and just outside a lesion.

    A voxel of the inner shell is lesion with a face neighbour outside; one
    of the outer shell is background with a face neighbour in the lesion.
    These are the voxels whose membership a partial-volume edge decides, so
    they bound how far the boundary's placement alone can move the volume.

    Parameters
    ----------
    mask : (I, J, K) array_like
        Non-zero = lesion.
    affine : (4, 4) array_like
        Voxel-to-world affine, in mm.

    Returns
    -------
    inner_ml, outer_ml : float
        Shell volumes on the mask's own grid, in mL.
    """
    mask = np.asarray(mask) != 0
    if not mask.any():
        return 0.0, 0.0
    face = ndimage.generate_binary_structure(3, 1)
    # Lesion on the array's edge is inner shell (erosion's border is
    # background); the outer shell stays inside the field of view.
    inner = mask & ~ndimage.binary_erosion(mask, face)
    outer = ndimage.binary_dilation(mask, face) & ~mask
    ml = voxel_volume_mm3(affine) / 1000.0
    return float(inner.sum() * ml), float(outer.sum() * ml)
