"""khe_vol.segmentation.edges: the boundary moves onto the steepest edge, along fine axes only."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from khe_vol.segmentation.edges import refine_edges
from khe_vol.segmentation.params import SegmentationParams


def test_boundary_one_voxel_inside_moves_onto_the_edge_along_fine_axes_only():
    spacing_mm = np.array([0.8, 0.8, 4.0])
    truth = np.zeros((40, 40, 12), bool)
    truth[10:30, 12:28, 3:9] = True
    image = ndimage.gaussian_filter(np.where(truth, 400.0, 200.0), (1.0, 1.0, 0.3)).astype(np.float32)
    shrunk = np.zeros_like(truth)
    shrunk[11:29, 13:27, 4:8] = True  # a threshold one voxel too strict on every side
    refined = refine_edges(image, shrunk, spacing_mm, SegmentationParams())
    expected = np.zeros_like(truth)
    expected[10:30, 12:28, 4:8] = True  # fine axes onto the edge; the 4 mm axis is left to the threshold
    expected[[10, 10, 29, 29], [12, 27, 12, 27]] = False  # blurred corners are below half-way
    np.testing.assert_array_equal(refined, expected)
    # on the edge already: stays
    np.testing.assert_array_equal(refine_edges(image, refined, spacing_mm, SegmentationParams()), refined)


def test_no_edge_refinement_when_switched_off_or_empty():
    image = np.random.default_rng(0).normal(size=(8, 8, 4)).astype(np.float32)
    region = image > 0
    assert refine_edges(image, region, (1, 1, 1), SegmentationParams(edge_sigma_mm=0)) is region
    assert not refine_edges(image, np.zeros_like(region), (1, 1, 1), SegmentationParams()).any()
