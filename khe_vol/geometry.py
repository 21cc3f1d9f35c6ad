"""Physical-space geometry: affines, RAS/LPS frames, grids and resampling.

Conventions
-----------
* An *affine* is the 4x4 NIfTI voxel-to-world matrix as nibabel returns it:
  it maps array indices ``(i, j, k)`` of a nibabel array to scanner RAS+
  millimetres (x to the Right, y to the Anterior, z to the Superior).
* SimpleITK images live in LPS+ millimetres and store arrays as ``[k, j, i]``;
  :func:`to_sitk` and :func:`from_sitk` are the only places that convert.
* Nothing here assumes that array axes of two images mean the same thing:
  every comparison between grids goes through world coordinates.
"""

from __future__ import annotations

from fractions import Fraction

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

#: Flip between RAS+ and LPS+ world coordinates (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


#: Relative precision of geometry read from a NIfTI header: float32 keeps
#: about 7 significant digits (half an ulp is 6e-8); quaternion maths on a
#: qform adds a little. Differences below this are representation noise.
HEADER_RELATIVE_PRECISION = 2.5e-7


def header_decimal(value, rel_tol=HEADER_RELATIVE_PRECISION):
    """The shortest decimal within header precision of a float32-stored length.

    A header stores 0.55 mm as 0.550000012; the scanner meant 0.55. The
    value with the fewest significant digits within ``rel_tol`` of the
    stored one is returned (0.46875 and 0.4296875, exact in float32, stay
    as they are).

    Parameters
    ----------
    value : float
        A positive length read from a header, mm.
    rel_tol : float
        Relative tolerance.

    Returns
    -------
    float
    """
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        return value
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if abs(candidate - value) <= rel_tol * value:
            return candidate
    return value


def voxel_volume_mm3(affine):
    """Volume of one voxel in cubic millimetres, free of float32 header noise.

    Parameters
    ----------
    affine : (4, 4) array_like
        Voxel-to-world affine in millimetres.

    Returns
    -------
    float
        ``|det(affine[:3, :3])|``, in mm^3. When the voxel axes are
        orthogonal (to header precision) it is the product of the edge
        lengths, each taken as :func:`header_decimal`: so two grids of
        0.55 x 0.55 x 4 and 0.3 x 0.7 x 3.3 mm compare exactly, as their
        headers meant (a change of exactly -20 % between them is -20 %, not
        -20.0000004 %). Sheared grids keep ``|det|`` as is.
    """
    m = np.asarray(affine, dtype=float)[:3, :3]
    det = abs(float(np.linalg.det(m)))
    sizes = voxel_sizes_mm(m)
    if det == 0 or np.any(sizes == 0):
        return det
    # |det| of the unit direction matrix is 1 for orthogonal axes.
    if abs(det / float(np.prod(sizes)) - 1.0) > 10 * HEADER_RELATIVE_PRECISION:
        return det
    # The product of the decimals, correctly rounded once (0.33 x 0.33 x 1.1
    # is 0.11979, not 0.11979000000000002).
    edges = [Fraction(repr(header_decimal(s))) for s in sizes]
    decimal_mm3 = float(edges[0] * edges[1] * edges[2])
    # A slight shear passes the test above yet lengthens the edges: then the
    # edge product is not the voxel volume, and |det| is kept.
    return decimal_mm3 if abs(decimal_mm3 / det - 1.0) <= 4 * HEADER_RELATIVE_PRECISION else det


def voxel_sizes_mm(affine):
    """Edge lengths of a voxel along each array axis, in millimetres (4x4 affine or its 3x3)."""
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))


def world_to_voxel(points_ras_mm, affine):
    """Map RAS+ mm points to continuous voxel indices of a grid.

    Parameters
    ----------
    points_ras_mm : (..., 3) array_like
        Points in scanner RAS+ millimetres.
    affine : (4, 4) array_like
        Voxel-to-world affine of the grid.

    Returns
    -------
    ndarray, shape (..., 3)
        Continuous ``(i, j, k)`` indices (voxel centres are integers).
    """
    points = np.asarray(points_ras_mm, dtype=float)
    inv = np.linalg.inv(np.asarray(affine, dtype=float))
    return points @ inv[:3, :3].T + inv[:3, 3]


def voxel_to_world(indices, affine):
    """Map voxel indices ``(..., 3)`` to RAS+ millimetres."""
    idx = np.asarray(indices, dtype=float)
    aff = np.asarray(affine, dtype=float)
    return idx @ aff[:3, :3].T + aff[:3, 3]


def seed_voxel(seed_ras_mm, affine, shape):
    """Nearest voxel to a RAS+ mm seed, or ``None`` if it lies outside the grid.

    Parameters
    ----------
    seed_ras_mm : (3,) array_like
        Seed point in scanner RAS+ millimetres.
    affine : (4, 4) array_like
        Voxel-to-world affine of the grid.
    shape : sequence of int
        Spatial shape of the grid (first three axes used).

    Returns
    -------
    tuple of int or None
    """
    ijk = np.rint(world_to_voxel(seed_ras_mm, affine)).astype(int)
    if np.any(ijk < 0) or np.any(ijk >= np.asarray(shape[:3])):
        return None
    return tuple(int(v) for v in ijk)


def to_canonical(data, affine):
    """The same voxels with array axes in the closest RAS+ order (nibabel's closest canonical).

    Two files holding one series in different array orders (a flipped or
    permuted axis, as dcm2niix and other writers differ) give the same
    canonical array and affine, so what is computed on it does not depend
    on the order a file happened to use.

    Parameters
    ----------
    data : (I, J, K) array_like
    affine : (4, 4) array_like
        Voxel-to-world RAS+ mm.

    Returns
    -------
    data : ndarray
        Contiguous, axes permuted and flipped.
    affine : ndarray
        Voxel-to-world RAS+ mm of the canonical array (same world positions).
    ornt : ndarray
        The orientation applied; :func:`from_canonical` undoes it.
    """
    data = np.asarray(data)
    affine = np.asarray(affine, dtype=float)
    ornt = nib.orientations.io_orientation(affine)
    canonical = np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))
    return canonical, affine @ nib.orientations.inv_ornt_aff(ornt, data.shape[:3]), ornt


def from_canonical(data, ornt):
    """An array computed on :func:`to_canonical`'s grid, back in the original array order."""
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(np.asarray(data), back))


def resample_mask_to_grid(mask, mask_affine, target_shape, target_affine):
    """Bring a binary mask onto another grid by physical position.

    Each target voxel centre is mapped to the source grid through world
    coordinates and takes the value of the nearest source voxel, so a mask
    stored with flipped, permuted or oblique axes lands where it belongs.

    Parameters
    ----------
    mask : (I, J, K) array_like
        Source mask; non-zero means lesion.
    mask_affine : (4, 4) array_like
        Voxel-to-world affine of the source mask.
    target_shape : sequence of int
        Spatial shape of the target grid.
    target_affine : (4, 4) array_like
        Voxel-to-world affine of the target grid.

    Returns
    -------
    ndarray of uint8, shape ``target_shape``
        0/1 mask on the target grid; voxels outside the source grid are 0.
    """
    source = (np.asarray(mask) != 0).astype(np.uint8)
    # target index -> world -> source index, as one affine.
    t2s = np.linalg.inv(np.asarray(mask_affine, dtype=float)) @ np.asarray(
        target_affine, dtype=float
    )
    return ndimage.affine_transform(
        source,
        t2s[:3, :3],
        offset=t2s[:3, 3],
        output_shape=tuple(int(s) for s in target_shape[:3]),
        order=0,
        # "grid-constant": a target centre within half a voxel of the source's
        # edge takes that edge voxel; "constant" would drop it (even a centre at
        # -1e-16 from an identical grid's first slice).
        mode="grid-constant",
        cval=0,
    ).astype(np.uint8)


def to_sitk(array, affine):
    """Wrap a nibabel-ordered array and RAS+ affine as a SimpleITK image.

    Parameters
    ----------
    array : (I, J, K) ndarray
        Image data indexed as nibabel returns it.
    affine : (4, 4) array_like
        Voxel-to-world RAS+ affine.

    Returns
    -------
    SimpleITK.Image
        Same voxels, LPS+ origin and direction, spacing in mm.
    """
    aff = np.asarray(affine, dtype=float)
    spacing = voxel_sizes_mm(aff)
    direction_lps = RAS_TO_LPS @ (aff[:3, :3] / spacing)
    origin_lps = RAS_TO_LPS @ aff[:3, 3]
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in direction_lps.ravel()])
    image.SetOrigin([float(v) for v in origin_lps])
    return image


def from_sitk(image):
    """Unwrap a SimpleITK image into a nibabel-ordered array and RAS+ affine.

    Inverse of :func:`to_sitk`.
    """
    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    direction_lps = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = RAS_TO_LPS @ direction_lps * spacing
    affine[:3, 3] = RAS_TO_LPS @ np.asarray(image.GetOrigin(), dtype=float)
    return array, affine


def shrink_by_index(array, affine, factors):
    """One voxel of every block of ``factors`` voxels, picked by index, with its affine.

    The voxel at index ``(f - 1) // 2`` of each block along each axis: the
    same voxels however the header places the grid in space. (SimpleITK's
    ``Shrink`` picks each by rounding a physical position, so a change of the
    header far below a voxel picked other voxels wherever a factor is even.)

    Parameters
    ----------
    array : (I, J, K) ndarray
    affine : (4, 4) array_like
        Voxel-to-world RAS+ affine.
    factors : (3,) int
        Block size along each axis, voxels.

    Returns
    -------
    small : ndarray
        C-contiguous.
    small_affine : (4, 4) ndarray
    """
    factors = [int(f) for f in factors]
    picks = tuple(slice((f - 1) // 2, int(n), f) for n, f in zip(np.shape(array)[:3], factors))
    small_affine = np.array(affine, dtype=float)
    small_affine[:3, 3] = voxel_to_world([s.start for s in picks], affine)
    small_affine[:3, :3] = small_affine[:3, :3] * np.asarray(factors, float)
    return np.ascontiguousarray(np.asarray(array)[picks]), small_affine


def signed_distance_mm(mask, spacing_mm):
    """Signed Euclidean distance in mm from each voxel centre to the edge of ``mask``.

    Exact on the anisotropic grid (Maurer's algorithm, SimpleITK): negative
    inside the mask, positive outside. Only distances matter, so the grid's
    orientation and origin are left out.

    Parameters
    ----------
    mask : (I, J, K) array_like of bool
        Indexed as nibabel returns it.
    spacing_mm : (3,) float
        Voxel sizes along I, J, K, mm.

    Returns
    -------
    (I, J, K) ndarray of float32
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(mask, (2, 1, 0))).astype(np.uint8))
    image.SetSpacing([float(v) for v in spacing_mm])
    dist = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.transpose(sitk.GetArrayFromImage(dist), (2, 1, 0))


def ras_to_lps(point_ras_mm):
    """Convert a RAS+ mm point to LPS+ mm (SimpleITK's physical frame)."""
    return RAS_TO_LPS @ np.asarray(point_ras_mm, dtype=float)


def grid_corners_world(shape, affine):
    """The 8 outer corners of a grid's field of view, in RAS+ mm, shape (8, 3)."""
    lo = np.full(3, -0.5)
    hi = np.asarray(shape[:3], dtype=float) - 0.5
    corners = np.array([[hi[0] if a else lo[0], hi[1] if b else lo[1], hi[2] if c else lo[2]]
                        for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    return voxel_to_world(corners, affine)


def affine_disagreement(affine_a, affine_b, shape):
    """How differently two affines place one grid.

    Parameters
    ----------
    affine_a, affine_b : (4, 4) array_like
        Voxel-to-world affines, mm.
    shape : sequence of int
        Spatial shape of the grid.

    Returns
    -------
    distance_mm : float
        Largest distance between the world positions the two give the
        centre of a corner voxel (the largest over the field of view, since
        the difference is affine).
    rotation_deg : float
        Largest angle between corresponding voxel axes (180 for a flip).
    """
    a, b = np.asarray(affine_a, float), np.asarray(affine_b, float)
    extent = np.asarray(shape[:3], float) - 1
    corners = np.array([[i, j, k] for i in (0, extent[0]) for j in (0, extent[1]) for k in (0, extent[2])])
    distance_mm = float(np.linalg.norm(voxel_to_world(corners, a) - voxel_to_world(corners, b), axis=1).max())
    ua, ub = a[:3, :3] / voxel_sizes_mm(a), b[:3, :3] / voxel_sizes_mm(b)
    cosines = np.clip((ua * ub).sum(axis=0), -1.0, 1.0)
    return distance_mm, float(np.degrees(np.arccos(cosines)).max())


def grids_overlap(shape_a, affine_a, shape_b, affine_b):
    """Whether two fields of view share any physical space.

    Tests the axis-aligned box of grid *b*'s corners in grid *a*'s index
    space against grid *a*'s extent; exact for grids with parallel axes and
    conservative (may say True) for oblique ones.
    """
    idx = world_to_voxel(grid_corners_world(shape_b, affine_b), affine_a)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    extent = np.asarray(shape_a[:3], dtype=float) - 0.5
    return bool(np.all(hi >= -0.5) and np.all(lo <= extent))
