"""khe_vol.segmentation.intensity: robust spread, tissue level, the intensity model, smoothing, threads."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from khe_vol.geometry import voxel_sizes_mm
from khe_vol.segmentation.intensity import (
    IntensityModel,
    initial_model,
    itk_threads,
    robust_sd,
    smooth_mm,
    tissue_level,
    update_model,
)
from khe_vol.segmentation.params import SegmentationParams

RNG = np.random.default_rng(3)
# A region: 30 % dark (suppressed fat, air), 60 % ordinary tissue, 10 % lesion.
DARK = RNG.normal(10, 3, 30_000)
TISSUE = RNG.normal(200, 10, 60_000)
LESION = RNG.normal(400, 20, 10_000)


def test_robust_sd_is_the_sd_of_gaussian_data_and_ignores_outliers():
    values = np.concatenate([RNG.normal(0, 5, 20_000), np.full(500, 1e6)])
    assert abs(robust_sd(values) - 5) < 0.2
    assert robust_sd([]) == 0.0


def test_tissue_level_is_the_mode_above_the_dark_class_whatever_the_lesion_share():
    for lesion_share in (2_000, 10_000, 40_000):
        level, dark, sd = tissue_level(np.concatenate([DARK, TISSUE, LESION[:lesion_share % 10_001]]))
        assert abs(level - 200) < 4 and 20 < dark < 180 and 7 < sd < 13


def test_model_thresholds():
    params = SegmentationParams()
    model = IntensityModel(lesion=400.0, surround=200.0, lesion_sd=20.0, dark=40.0, floor=200.0)
    assert model.contrast == 200.0
    assert model.lower(params) == 200.0 + params.lower_fraction * 200.0
    assert model.upper(params) == 400.0 + max(params.fluid_fraction * 200.0, params.fluid_sd_factor * 20.0)
    assert model.as_dict(params)["lower_threshold"] == model.lower(params)


def test_initial_model_finds_the_lesion_around_a_seed_on_a_septum():
    roi = np.concatenate([DARK, TISSUE, LESION])
    sample = np.concatenate([LESION[:300], np.full(100, 210.0)])  # a dark septum under the seed
    model, tissue_sd = initial_model(roi, sample)
    assert abs(model.lesion - 400) < 10 and abs(model.surround - 200) < 4 and model.floor == model.surround
    assert 7 < tissue_sd < 13


def test_update_model_takes_the_lesion_level_and_keeps_the_tissue_level():
    params = SegmentationParams()
    smoothed = np.full((30, 30, 10), 200.0)
    region = np.zeros(smoothed.shape, bool)
    region[5:25, 5:25, 2:8] = True
    smoothed[region] = 420.0
    smoothed[12, 12, 4] = 150.0  # a septum in the region: below the lower threshold, not lesion level
    start = IntensityModel(lesion=350.0, surround=200.0, lesion_sd=30.0, dark=40.0, floor=200.0)
    new = update_model(start, smoothed, region, np.array([1.0, 1.0, 3.0]), params)
    assert new.lesion == 420.0 and new.surround == 200.0 and new.lesion_sd == 0.0


def test_smooth_mm_has_the_physical_sigma_on_each_axis():
    affine = np.diag([0.5, 1.0, 2.0, 1.0])
    impulse = np.zeros((81, 41, 21), np.float32)
    impulse[40, 20, 10] = 1.0
    out = smooth_mm(impulse, affine, 3.0)
    assert abs(out.sum() - 1) < 0.02
    for axis, spacing in enumerate(voxel_sizes_mm(affine)):
        profile = out.sum(axis=tuple(a for a in range(3) if a != axis))
        x_mm = (np.arange(profile.size) - profile.size // 2) * spacing
        assert abs(np.sqrt((profile * x_mm**2).sum() / profile.sum()) - 3.0) < 0.3
    np.testing.assert_allclose(smooth_mm(np.full((9, 9, 9), 5.0), affine, 3.0), 5.0, rtol=1e-5)


def test_itk_threads_sets_and_restores_the_default():
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    with itk_threads(1):
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before
