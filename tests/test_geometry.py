import nibabel as nib
import numpy as np
import pytest

from khe_vol.geometry import (
    from_sitk,
    grids_overlap,
    resample_mask_to_grid,
    seed_voxel,
    to_sitk,
    voxel_sizes_mm,
    voxel_to_world,
    voxel_volume_mm3,
    world_to_voxel,
)
from tests.conftest import make_affine, rotation


def test_voxel_volume_is_abs_det_on_any_orientation():
    lps = make_affine((0.55, 0.55, 4.0), (10, 20, 30), flips=(-1, -1, 1))
    oblique = make_affine((0.5, 0.7, 3.0), (0, 0, 0), rot=rotation("x", 17) @ rotation("z", 33))
    assert voxel_volume_mm3(lps) == pytest.approx(0.55 * 0.55 * 4.0)
    assert voxel_volume_mm3(oblique) == pytest.approx(0.5 * 0.7 * 3.0)
    assert np.allclose(voxel_sizes_mm(oblique), [0.5, 0.7, 3.0])


def test_world_voxel_round_trip_oblique():
    aff = make_affine((0.8, 0.8, 4), (-50, 30, 12), rot=rotation("y", 20), flips=(-1, 1, -1))
    ijk = np.array([[0, 0, 0], [3.5, 7, 2], [100, 20, 9]])
    assert np.allclose(world_to_voxel(voxel_to_world(ijk, aff), aff), ijk)


def test_sitk_conversion_keeps_physical_positions():
    aff = make_affine((0.7, 0.9, 3.5), (12, -40, 7), rot=rotation("z", 25) @ rotation("x", -10), flips=(-1, -1, 1))
    arr = np.random.default_rng(0).random((6, 7, 5)).astype(np.float32)
    img = to_sitk(arr, aff)
    ijk = (2, 5, 3)
    lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
    ras = voxel_to_world(ijk, aff)
    assert np.allclose(lps, ras * [-1, -1, 1])  # SimpleITK is LPS
    assert img.GetPixel(ijk) == arr[ijk]
    back, back_aff = from_sitk(img)
    assert np.array_equal(back, arr) and np.allclose(back_aff, aff)


def test_seed_voxel_inside_and_outside():
    aff = make_affine((1, 1, 3), (-20, -20, -18), flips=(-1, 1, 1))
    ijk = seed_voxel(voxel_to_world([5, 7, 2], aff), aff, (40, 40, 12))
    assert ijk == (5, 7, 2)
    assert seed_voxel([500, 0, 0], aff, (40, 40, 12)) is None


@pytest.mark.parametrize(
    "transpose, flips",
    [((0, 1, 2), (-1, 1, 1)), ((2, 0, 1), (1, -1, 1)), ((1, 0, 2), (-1, -1, -1))],
)
def test_mask_on_flipped_permuted_grid_lands_in_place(transpose, flips):
    """A mask stored with other axis order and direction maps back voxel for voxel."""
    aff = make_affine((1.0, 1.0, 3.0), (-10, -12, -6), rot=rotation("z", 12))
    mask = np.zeros((20, 24, 6), np.uint8)
    mask[3:9, 5:15, 1:4] = 1
    mask[12, 20, 5] = 1
    # Same voxels on a grid whose axes are permuted and flipped: build its affine
    # so that each stored voxel sits at the same world position.
    perm = np.eye(4)[list(transpose) + [3]].T  # new index -> old index (permutation)
    other = np.transpose(mask, transpose)
    flip = np.eye(4)
    for ax, f in enumerate(flips):
        if f < 0:
            flip[ax, ax] = -1
            flip[ax, 3] = other.shape[ax] - 1
            other = np.flip(other, ax)
    other_aff = aff @ perm @ flip
    assert nib.aff2axcodes(other_aff) != nib.aff2axcodes(aff)
    back = resample_mask_to_grid(other, other_aff, mask.shape, aff)
    assert np.array_equal(back, mask)


def test_resample_mask_oblique_grid_keeps_volume():
    target = make_affine((1, 1, 1), (-30, -30, -30))
    source = make_affine((0.5, 0.5, 0.5), (0, 0, 0), rot=rotation("x", 30))
    source[:3, 3] = np.array([0, 0, -5]) - source[:3, :3] @ [59.5, 59.5, 59.5]  # centred on the ball
    ijk = np.indices((120, 120, 120)).reshape(3, -1).T
    inside = np.linalg.norm(voxel_to_world(ijk, source) - [0, 0, -5], axis=1) <= 10
    src = inside.reshape(120, 120, 120).astype(np.uint8)
    out = resample_mask_to_grid(src, source, (60, 60, 60), target)
    vol_src = src.sum() * voxel_volume_mm3(source)
    vol_out = out.sum() * voxel_volume_mm3(target)
    assert vol_out == pytest.approx(4 / 3 * np.pi * 1000, rel=0.05)
    assert vol_out == pytest.approx(vol_src, rel=0.05)


def test_grids_overlap():
    a = make_affine((1, 1, 1), (0, 0, 0))
    assert grids_overlap((10, 10, 10), a, (10, 10, 10), make_affine((1, 1, 1), (5, 5, 5)))
    assert not grids_overlap((10, 10, 10), a, (10, 10, 10), make_affine((1, 1, 1), (50, 0, 0)))
    # Same space, stored flipped: overlaps.
    flipped = make_affine((1, 1, 1), (9, 0, 0), flips=(-1, 1, 1))
    assert grids_overlap((10, 10, 10), a, (10, 10, 10), flipped)


def test_voxel_volume_of_a_slightly_sheared_grid_is_its_determinant():
    # Found by hypothesis: a 0.002 shear passes as orthogonal, but the product of
    # the (lengthened) edges would be 8.000016 mm^3 for a voxel of 8 mm^3.
    affine = np.diag([4.0, 1.0, -2.0, 1.0])
    affine[0, 2] = 0.004
    assert voxel_volume_mm3(affine) == pytest.approx(8.0, rel=1e-12)
