"""Grids and morphology in millimetres: boxes, balls, mm dilation/erosion/opening/closing,
hole filling and connected components, on anisotropic grids (every radius in mm)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from khe_vol.geometry import signed_distance_mm, voxel_to_world
from khe_vol.segmentation.labels import select_labels


#: Distances within this share of a radius count as at the radius. Grids that
#: differ below a voxel by a header's precision (a DICOM decimal string, a
#: float32 affine, another converter) place voxel centres at distances a few
#: parts in 1e5 apart; without the slack, a voxel exactly one radius away was in
#: a ball on one and out on the other, and the mask (and volume) changed.
RADIUS_RTOL = 1e-3


def within_mm(radius_mm):
    """The distance up to which a voxel counts as within ``radius_mm`` (:data:`RADIUS_RTOL`)."""
    return float(radius_mm) * (1.0 + RADIUS_RTOL)


def voxels_covering(radius_mm, spacing_mm):
    """Whole voxels along each axis that cover ``radius_mm`` (a box's half-width, a pad), as ints.

    ``ceil(radius / spacing)``, with a spacing a hair off a whole fraction of
    the radius rounded as the whole fraction (:data:`RADIUS_RTOL`).
    """
    ratio = float(radius_mm) / np.asarray(spacing_mm, float)
    return np.ceil(ratio * (1.0 - RADIUS_RTOL)).astype(int)


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
    half = voxels_covering(radius_mm, spacing_mm)
    lo = np.maximum(np.asarray(center_ijk) - half, 0)
    hi = np.minimum(np.asarray(center_ijk) + half + 1, np.asarray(shape[:3]))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def bounding_box(mask):
    """First and last index of a non-empty mask along each axis, as two (3,) int arrays.

    From the mask's projections on each axis (three reductions), not from the
    index of every voxel set (``np.argwhere``, a tenth of a series job).
    """
    mask = np.asarray(mask, bool)
    lo, hi = [], []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo.append(hit[0])
        hi.append(hit[-1])
    return np.asarray(lo), np.asarray(hi)


def mask_box(mask, spacing_mm, margin_mm):
    """Bounding box of a mask grown by ``margin_mm``, as index slices."""
    first, last = bounding_box(mask)
    margin = voxels_covering(margin_mm, spacing_mm)
    lo = np.maximum(first - margin, 0)
    hi = np.minimum(last + margin + 1, mask.shape)
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
    reach = within_mm(radius_mm)
    half = np.floor(reach / np.asarray(spacing_mm, float)).astype(int)
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    return sum((g * s) ** 2 for g, s in zip(grids, spacing_mm)) <= reach**2


def distance_outside_mm(mask, spacing_mm):
    """Distance in mm from each voxel centre to the nearest voxel of ``mask`` (0 inside).

    Exact Euclidean distance on the anisotropic grid (Maurer's algorithm,
    SimpleITK); ``inf`` everywhere if the mask is empty.
    """
    if not mask.any():
        return np.full(mask.shape, np.inf, np.float32)
    return np.maximum(signed_distance_mm(mask, spacing_mm), 0)


def on_mask_box(operation, mask, margin_voxels):
    """``operation(mask)`` computed on the mask's bounding box grown by ``margin_voxels``.

    For operations whose result lies within that box and depends only on
    the mask there (a dilation, erosion or opening by a ball no wider than
    the margin): the same voxels, at the cost of the lesion's box rather than
    the whole region.

    Parameters
    ----------
    operation : callable
        ndarray of bool -> ndarray of bool of the same shape.
    mask : ndarray of bool
    margin_voxels : (3,) int

    Returns
    -------
    ndarray of bool
    """
    mask = np.asarray(mask, bool)
    out = np.zeros(mask.shape, bool)
    if not mask.any():
        return out
    margin = np.asarray(margin_voxels, int) + 1
    box = tuple(slice(int(max(a - m, 0)), int(min(b + m + 1, n)))
                for a, b, m, n in zip(*bounding_box(mask), margin, mask.shape))
    out[box] = operation(mask[box])
    return out


def grow_voxels(mask, n_voxels=1):
    """Dilation by ``n_voxels`` in every direction (a cube of ``2 n + 1`` voxels), on the mask's box.

    For rims measured in voxels, not mm: the partial-volume rim of fluid, what
    touches a lesion.
    """
    cube = np.ones((2 * int(n_voxels) + 1,) * 3, bool)
    return on_mask_box(lambda sub: ndimage.binary_dilation(sub, structure=cube), mask, (int(n_voxels),) * 3)


def dilate_mm(mask, spacing_mm, radius_mm):
    """Dilation by a ball of ``radius_mm``: voxels within that distance of the mask."""
    if radius_mm <= 0:
        return mask.copy()
    ball = ball_structure(spacing_mm, radius_mm)
    if ball.sum() <= _SMALL_BALL_VOXELS:
        def operation(sub):
            return ndimage.binary_dilation(sub, structure=ball)
    else:
        def operation(sub):
            return distance_outside_mm(sub, spacing_mm) <= within_mm(radius_mm)
    return on_mask_box(operation, mask, np.asarray(ball.shape) // 2)


def erode_mm(mask, spacing_mm, radius_mm):
    """Erosion by a ball of ``radius_mm``; the array border is not background."""
    if radius_mm <= 0:
        return mask.copy()
    ball = ball_structure(spacing_mm, radius_mm)
    if ball.sum() <= _SMALL_BALL_VOXELS:
        def operation(sub):
            return ndimage.binary_erosion(sub, structure=ball, border_value=1)
    else:
        def operation(sub):
            padded = np.pad(sub, 1, mode="edge")
            inner = tuple(slice(1, -1) for _ in range(sub.ndim))
            return distance_outside_mm(~padded, spacing_mm)[inner] > within_mm(radius_mm)
    # Within the box the mask is surrounded by background wherever the box is
    # not the array's edge, so the crop erodes as the whole array would.
    return on_mask_box(operation, mask, np.asarray(ball.shape) // 2)


def opening_mm(mask, spacing_mm, radius_mm):
    """Opening by a ball of ``radius_mm``: removes parts thinner than ``2 * radius_mm``."""
    return dilate_mm(erode_mm(mask, spacing_mm, radius_mm), spacing_mm, radius_mm) & mask


def closing_mm(mask, spacing_mm, radius_mm):
    """Closing by a ball of ``radius_mm``: bridges gaps narrower than ``2 * radius_mm``."""
    if radius_mm <= 0:
        return mask.copy()
    pad = voxels_covering(radius_mm, spacing_mm) + 1
    padded = np.pad(mask, [(int(p), int(p)) for p in pad])
    closed = erode_mm(dilate_mm(padded, spacing_mm, radius_mm), spacing_mm, radius_mm)
    inner = tuple(slice(int(p), int(p) + n) for p, n in zip(pad, mask.shape))
    return closed[inner] | mask


def fill_holes(mask, slice_axis=None):
    """Fill enclosed holes in 3D and, optionally, in every slice along ``slice_axis``.

    The same voxels as ``scipy.ndimage.binary_fill_holes`` (face connectivity),
    in 3D and on each slice, found by labelling the background once: a
    background component that reaches the array's edge (a slice's in-plane
    edge) is outside, every other one a hole. (The slice-by-slice loop of
    ``binary_fill_holes`` was a tenth of a series job.)
    """
    filled = _fill_background_components(mask, ndimage.generate_binary_structure(3, 1), range(3))
    if slice_axis is not None:
        in_plane = ndimage.generate_binary_structure(3, 1)
        index = [slice(None)] * 3
        index[slice_axis] = [0, 2]
        in_plane[tuple(index)] = False  # no connection across slices
        filled = _fill_background_components(filled, in_plane, [a for a in range(3) if a != slice_axis])
    return filled


def _fill_background_components(mask, structure, edge_axes):
    """``mask`` with the background components not touching the array's faces along ``edge_axes``."""
    mask = np.asarray(mask, bool)
    labels, n = ndimage.label(~mask, structure=structure)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, bool)
    for axis in edge_axes:
        outside[np.take(labels, 0, axis=axis)] = True
        outside[np.take(labels, -1, axis=axis)] = True
    return mask | ~outside[labels]


def thickest_axis(spacing_mm):
    """The array axis of the thickest voxels: the first within :data:`RADIUS_RTOL` of the largest size.

    On a grid with equal sizes a hair apart (1 x 1 x 1.00003 mm) that is the
    first axis, as on the exactly isotropic grid, not the one a header's
    rounding made longest.
    """
    spacing = np.asarray(spacing_mm, float)
    return int(np.flatnonzero(spacing >= spacing.max() * (1.0 - RADIUS_RTOL))[0])


def fine_axes(spacing_mm):
    """Which array axes are finely sampled: voxel edges at most 1.5 x the finest (the in-plane
    axes of a 2D acquisition; every axis of a near-isotropic grid)."""
    spacing = np.asarray(spacing_mm, float)
    return spacing <= 1.5 * spacing.min()


def fill_lesion_holes(mask, spacing_mm, params):
    """:func:`fill_holes` in 3D and, if ``params.fill_holes_slicewise``, slice by slice across the thickest axis."""
    return fill_holes(mask, thickest_axis(spacing_mm) if params.fill_holes_slicewise else None)


def ball_mask(shape, center_ijk, spacing_mm, radius_mm):
    """Voxels whose centres lie within ``radius_mm`` of a voxel centre."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, center_ijk, spacing_mm))
    return d2 <= within_mm(radius_mm) ** 2


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
        nearest = float(dist_mm.min())
        if nearest > within_mm(radius_mm):
            return np.zeros(mask.shape, bool)
        # The first in array order of the nearest, not of the nearest to the last bit:
        # equal lattice distances must not be told apart by a header's rounding.
        best = int(np.flatnonzero(dist_mm <= within_mm(nearest))[0])
        lab = labels[sub][tuple(idx[best])]
    return labels == lab


def components_touching(mask, start):
    """Union of the connected components of ``mask`` that overlap ``start``."""
    labels, n = ndimage.label(mask)
    touched = np.zeros(n + 1, bool)
    touched[labels[start & mask]] = True
    return select_labels(labels, touched[1:])
