"""khe_vol.segmentation.morphology against scipy.ndimage on anisotropic grids (radii in mm)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from khe_vol.geometry import voxel_to_world
from khe_vol.segmentation.morphology import (
    ball_mask,
    ball_structure,
    closing_mm,
    component_near,
    components_touching,
    crop_affine,
    crop_box,
    dilate_mm,
    distance_outside_mm,
    erode_mm,
    fill_holes,
    mask_box,
    opening_mm,
    thickest_axis,
    voxels_covering,
    within_mm,
)

SPACINGS_MM = [(0.55, 0.55, 4.0), (0.9, 1.3, 2.5), (3.0, 0.7, 0.7)]
# Small radii take the structuring-element path, large ones the distance map.
# None is a whole number of voxels on any axis (at such ties the float32 distance map and
# the ball may round either way).
RADII_MM = [0.8, 1.7, 4.3, 9.05]


def blobs(shape=(40, 36, 20), seed=0, margin=0):
    """Random smooth blobs: irregular, several components, holes."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    mask = field > 0.05
    if margin:
        mask[:margin] = mask[-margin:] = False
        mask[:, :margin] = mask[:, -margin:] = False
        mask[:, :, :margin] = mask[:, :, -margin:] = False
    return mask


def edt_mm(mask, spacing_mm):
    return ndimage.distance_transform_edt(mask, sampling=spacing_mm)


@pytest.mark.parametrize("spacing_mm", SPACINGS_MM)
def test_distance_outside_equals_scipy_edt(spacing_mm):
    mask = blobs(seed=1)
    dist = distance_outside_mm(mask, spacing_mm)
    np.testing.assert_allclose(dist, edt_mm(~mask, spacing_mm), atol=1e-4)
    assert (dist[mask] == 0).all()
    assert np.isinf(distance_outside_mm(np.zeros((4, 4, 4), bool), spacing_mm)).all()


@pytest.mark.parametrize("spacing_mm", SPACINGS_MM)
@pytest.mark.parametrize("radius_mm", RADII_MM)
def test_dilate_and_erode_equal_scipy_distance_thresholds(spacing_mm, radius_mm):
    mask = blobs(seed=2)
    reach = within_mm(radius_mm)  # a radius is read with RADIUS_RTOL of slack
    np.testing.assert_array_equal(dilate_mm(mask, spacing_mm, radius_mm), edt_mm(~mask, spacing_mm) <= reach)
    # Erosion: the array border is not background, as scipy's EDT (distance to the nearest 0 in the array).
    np.testing.assert_array_equal(erode_mm(mask, spacing_mm, radius_mm), edt_mm(mask, spacing_mm) > reach)


@pytest.mark.parametrize("spacing_mm", SPACINGS_MM)
@pytest.mark.parametrize("radius_mm", RADII_MM)
def test_opening_and_closing_equal_scipy_with_a_ball(spacing_mm, radius_mm):
    pad = np.ceil(radius_mm / np.asarray(spacing_mm)).astype(int) + 1
    mask = np.pad(blobs(seed=3), [(int(p), int(p)) for p in pad])  # away from the border: no border effects
    ball = ball_structure(spacing_mm, radius_mm)
    np.testing.assert_array_equal(opening_mm(mask, spacing_mm, radius_mm),
                                  ndimage.binary_opening(mask, structure=ball) & mask)
    np.testing.assert_array_equal(closing_mm(mask, spacing_mm, radius_mm),
                                  ndimage.binary_closing(mask, structure=ball) | mask)


def test_ball_structure_and_ball_mask_are_physical_balls():
    spacing_mm = (0.5, 1.0, 4.0)
    ball = ball_structure(spacing_mm, 4.0)
    assert ball.shape == (17, 9, 3)  # floor(4 / s) voxels each side
    assert ball[8, 4, 2] and ball[0, 4, 1] and ball[8, 4, 0] and not ball[0, 0, 1]
    mask = ball_mask((20, 20, 5), (10, 10, 2), spacing_mm, 4.0)
    np.testing.assert_array_equal(mask[2:19, 6:15, 1:4], ball[:, :, :])
    assert mask.sum() == ball.sum()


def test_boxes_and_crop_affine():
    spacing_mm = (0.5, 1.0, 4.0)
    box = crop_box((10, 3, 5), (30, 30, 8), spacing_mm, 6.0)
    assert box == (slice(0, 23), slice(0, 10), slice(3, 8))  # clipped to the grid
    mask = np.zeros((30, 30, 8), bool)
    mask[10:13, 5, 4] = True
    assert mask_box(mask, spacing_mm, 2.0) == (slice(6, 17), slice(3, 8), slice(3, 6))
    affine = np.array([[0, -1.0, 0, 12], [0.5, 0, 0, -3], [0, 0, 4.0, 7], [0, 0, 0, 1]])
    sub = crop_affine(affine, box)
    # voxel (i, j, k) of the crop is voxel (i + start) of the image, in world mm
    np.testing.assert_allclose(voxel_to_world([[1, 2, 0]], sub), voxel_to_world([[1 + 0, 2 + 0, 3]], affine))


def test_fill_holes_in_3d_and_slice_by_slice():
    mask = np.zeros((9, 9, 5), bool)
    mask[1:8, 1:8, 1:4] = True
    mask[4, 4, 2] = False  # enclosed in 3D
    mask[2:4, 2:4, 0:5] = False  # a tunnel open at both ends: a hole in each slice only
    filled = fill_holes(mask)
    assert filled[4, 4, 2] and not filled[2, 2, 2]
    assert fill_holes(mask, slice_axis=2)[2, 2, 2]
    assert not fill_holes(mask, slice_axis=0)[2, 2, 2]  # across axis 0 the tunnel is open


@pytest.mark.parametrize("slice_axis", [None, 0, 1, 2])
def test_fill_holes_equals_scipy_binary_fill_holes(slice_axis):
    """The background labelled once gives scipy's voxels, in 3D and on every slice."""
    for seed in range(6):
        mask = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(23, 17, 9)), 1.0) > 0.1
        expected = ndimage.binary_fill_holes(mask)
        if slice_axis is not None:
            moved = np.moveaxis(expected, slice_axis, 0)
            for k in range(moved.shape[0]):
                moved[k] = ndimage.binary_fill_holes(moved[k])
        np.testing.assert_array_equal(fill_holes(mask, slice_axis), expected)


def test_grids_a_header_rounding_apart_give_the_same_balls_boxes_and_slice_axis():
    """Voxel sizes 2.5e-5 apart (a DICOM decimal string, a float32 affine) must not flip a
    voxel exactly one radius away into or out of a ball, resize a box, or pick another
    slice axis."""
    exact, off = np.array([1.0, 1.0, 4.0]), np.array([1.0, 1.0, 4.0]) * np.array([1 - 1e-5, 1 - 1e-5, 1 + 2.5e-5])
    for radius_mm in (1.0, 2.0, 3.0, 4.0, 8.0):
        np.testing.assert_array_equal(ball_structure(off, radius_mm), ball_structure(exact, radius_mm))
        np.testing.assert_array_equal(ball_mask((25, 25, 9), (12, 12, 4), off, radius_mm),
                                      ball_mask((25, 25, 9), (12, 12, 4), exact, radius_mm))
        np.testing.assert_array_equal(voxels_covering(radius_mm, off), voxels_covering(radius_mm, exact))
        mask = blobs(seed=4)
        np.testing.assert_array_equal(dilate_mm(mask, off, radius_mm), dilate_mm(mask, exact, radius_mm))
        np.testing.assert_array_equal(erode_mm(mask, off, radius_mm), erode_mm(mask, exact, radius_mm))
    assert thickest_axis((1.0, 1.0, 1.0)) == thickest_axis((1.0, 1.0, 1.00003)) == 0
    assert thickest_axis((0.55, 0.55, 4.0)) == 2


def test_components_touching_and_component_near():
    mask = np.zeros((20, 10, 3), bool)
    mask[1:4, 1:4, 1] = True  # component a
    mask[10:12, 1:4, 1] = True  # component b
    mask[16:19, 6:9, 1] = True  # component c
    start = np.zeros_like(mask)
    start[2, 2, 1] = start[17, 7, 1] = True
    labels, _ = ndimage.label(mask)
    np.testing.assert_array_equal(components_touching(mask, start), np.isin(labels, [labels[2, 2, 1], labels[17, 7, 1]]))
    spacing_mm = (1.0, 1.0, 4.0)
    # inside b, and 3 mm beyond b along i: b either way; 10 mm away from everything: none
    np.testing.assert_array_equal(component_near(mask, (10, 2, 1), spacing_mm, 2.0), labels == labels[10, 2, 1])
    np.testing.assert_array_equal(component_near(mask, (14, 2, 1), spacing_mm, 3.5), labels == labels[10, 2, 1])
    assert not component_near(mask, (14, 2, 1), spacing_mm, 2.0).any()
