"""Grids and morphology in millimetres: boxes, balls, mm dilation/erosion/opening/closing,
hole filling and connected components, on anisotropic grids (every radius in mm)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from khe_vol.geometry import signed_distance_mm, voxel_to_world
from khe_vol.segmentation.labels import select_labels


def crop_box(center_ijk, shape, spacing_mm, radius_mm):
    """Index slices of a box of physical half-width ``radius_mm`` around a voxel.

    Parameters
    ----------
    center_ijk : (3,) int
    shape : (3,) int
    spacing_mm : (3,) float
    radius_mm : float

    Returns
    -------
    tuple of slice
    """
    half = np.ceil(float(radius_mm) / np.asarray(spacing_mm, float)).astype(int)
    lo = np.maximum(np.asarray(center_ijk) - half, 0)
    hi = np.minimum(np.asarray(center_ijk) + half + 1, np.asarray(shape[:3]))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def mask_box(mask, spacing_mm, margin_mm):
    """Bounding box of a mask grown by ``margin_mm``, as index slices."""
    idx = np.argwhere(mask)
    margin = np.ceil(float(margin_mm) / np.asarray(spacing_mm, float)).astype(int)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def crop_affine(affine, slices):
    """Affine of a sub-array ``array[slices]``."""
    out = np.array(affine, dtype=float)
    out[:3, 3] = voxel_to_world([s.start for s in slices], affine)
    return out


#: Balls up to this many voxels are applied as structuring elements; larger
#: ones through a distance transform (whose cost does not grow with radius).
_SMALL_BALL_VOXELS = 125


def ball_structure(spacing_mm, radius_mm):
    """Structuring element of the voxels within ``radius_mm`` of the centre voxel."""
    half = np.floor(float(radius_mm) / np.asarray(spacing_mm, float)).astype(int)
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    return sum((g * s) ** 2 for g, s in zip(grids, spacing_mm)) <= float(radius_mm) ** 2 + 1e-9


def distance_outside_mm(mask, spacing_mm):
    """Distance in mm from each voxel centre to the nearest voxel of ``mask`` (0 inside).

    Exact Euclidean distance on the anisotropic grid (Maurer's algorithm,
    SimpleITK); ``inf`` everywhere if the mask is empty.
    """
    if not mask.any():
        return np.full(mask.shape, np.inf, np.float32)
    return np.maximum(signed_distance_mm(mask, spacing_mm), 0)


def dilate_mm(mask, spacing_mm, radius_mm):
    """Dilation by a ball of ``radius_mm``: voxels within that distance of the mask."""
    if radius_mm <= 0:
        return mask.copy()
    ball = ball_structure(spacing_mm, radius_mm)
    if ball.sum() <= _SMALL_BALL_VOXELS:
        return ndimage.binary_dilation(mask, structure=ball)
    return distance_outside_mm(mask, spacing_mm) <= radius_mm


def erode_mm(mask, spacing_mm, radius_mm):
    """Erosion by a ball of ``radius_mm``; the array border is not background."""
    if radius_mm <= 0:
        return mask.copy()
    ball = ball_structure(spacing_mm, radius_mm)
    if ball.sum() <= _SMALL_BALL_VOXELS:
        return ndimage.binary_erosion(mask, structure=ball, border_value=1)
    padded = np.pad(mask, 1, mode="edge")
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    return distance_outside_mm(~padded, spacing_mm)[inner] > radius_mm


def opening_mm(mask, spacing_mm, radius_mm):
    """Opening by a ball of ``radius_mm``: removes parts thinner than ``2 * radius_mm``."""
    return dilate_mm(erode_mm(mask, spacing_mm, radius_mm), spacing_mm, radius_mm) & mask


def closing_mm(mask, spacing_mm, radius_mm):
    """Closing by a ball of ``radius_mm``: bridges gaps narrower than ``2 * radius_mm``."""
    if radius_mm <= 0:
        return mask.copy()
    pad = np.ceil(radius_mm / np.asarray(spacing_mm, float)).astype(int) + 1
    padded = np.pad(mask, [(int(p), int(p)) for p in pad])
    closed = erode_mm(dilate_mm(padded, spacing_mm, radius_mm), spacing_mm, radius_mm)
    inner = tuple(slice(int(p), int(p) + n) for p, n in zip(pad, mask.shape))
    return closed[inner] | mask


def fill_holes(mask, slice_axis=None):
    """Fill enclosed holes in 3D and, optionally, in every slice along ``slice_axis``."""
    filled = ndimage.binary_fill_holes(mask)
    if slice_axis is not None:
        moved = np.moveaxis(filled, slice_axis, 0)  # a view: filling it fills ``filled``
        for k in np.flatnonzero(moved.any(axis=(1, 2))):
            moved[k] = ndimage.binary_fill_holes(moved[k])
    return filled


def fill_lesion_holes(mask, spacing_mm, params):
    """:func:`fill_holes` in 3D and, if ``params.fill_holes_slicewise``, slice by slice across the thickest axis."""
    return fill_holes(mask, int(np.argmax(spacing_mm)) if params.fill_holes_slicewise else None)


def ball_mask(shape, center_ijk, spacing_mm, radius_mm):
    """Voxels whose centres lie within ``radius_mm`` of a voxel centre."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, center_ijk, spacing_mm))
    return d2 <= radius_mm**2


def component_near(mask, point_ijk, spacing_mm, radius_mm):
    """The connected component of ``mask`` nearest a voxel, if within ``radius_mm``.

    Returns
    -------
    ndarray of bool
        Empty if no component is that close.
    """
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(mask.shape, bool)
    lab = labels[tuple(point_ijk)]
    if lab == 0:
        sub = crop_box(point_ijk, mask.shape, spacing_mm, radius_mm)
        idx = np.argwhere(labels[sub] > 0)
        if idx.size == 0:
            return np.zeros(mask.shape, bool)
        offset = np.array([s.start for s in sub]) - np.asarray(point_ijk)
        dist_mm = np.sqrt((((idx + offset) * spacing_mm) ** 2).sum(axis=1))
        best = int(np.argmin(dist_mm))
        if dist_mm[best] > radius_mm:
            return np.zeros(mask.shape, bool)
        lab = labels[sub][tuple(idx[best])]
    return labels == lab


def components_touching(mask, start):
    """Union of the connected components of ``mask`` that overlap ``start``."""
    labels, n = ndimage.label(mask)
    touched = np.zeros(n + 1, bool)
    touched[labels[start & mask]] = True
    return select_labels(labels, touched[1:])
