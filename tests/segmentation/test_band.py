"""khe_vol.segmentation.band on small synthetic scenes (lesion, fluid beside or inside it)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scenes import FLUID, LESION, SPACING_MM, TISSUE, dice, scene

from khe_vol.segmentation.band import (band_segmentation, fluid_plateaus, interior_sd_contrast, iterate_segmentation,
                                       threshold_band_ml)
from khe_vol.segmentation.intensity import IntensityModel
from khe_vol.segmentation.params import SegmentationParams

PARAMS = SegmentationParams()
MODEL = IntensityModel(lesion=LESION, surround=TISSUE, lesion_sd=6.0, dark=60.0, floor=TISSUE)
# Where a reader clicks: in the lesion, off its centre.
SEED_IJK = (28, 36, 9)


def test_fluid_plateaus_find_the_flat_cyst_not_the_lesion():
    image, lesion, fluid = scene("beside")
    plateaus = fluid_plateaus(image, MODEL.upper(PARAMS), PARAMS.fluid_max_sd * MODEL.contrast,
                              PARAMS.fluid_height_sd)
    assert dice(plateaus, fluid) > 0.7
    assert not (plateaus & lesion & (image < 0.5 * (LESION + FLUID))).any()


def test_band_keeps_the_lesion_and_drops_fluid_beside_it_with_its_rim():
    image, lesion, fluid = scene("beside")
    region = band_segmentation(image, MODEL, SEED_IJK, SPACING_MM, PARAMS, search_radius_mm=5.0)
    assert dice(region, lesion) > 0.85
    # the cyst is out; of its blurred outer shell, where it meets the lesion, a voxel may stay
    assert not (region & ndimage.binary_erosion(fluid)).any()
    assert (region & fluid).sum() <= 0.02 * fluid.sum()


def test_band_keeps_a_fluid_core_the_lesion_surrounds():
    image, lesion, fluid = scene("inside")
    region = band_segmentation(image, MODEL, SEED_IJK, SPACING_MM, PARAMS, search_radius_mm=5.0)
    assert region[fluid].all()
    assert dice(region, lesion) > 0.85


def test_band_from_a_seed_outside_everything_is_empty():
    image, _, _ = scene("beside")
    assert not band_segmentation(image, MODEL, (3, 3, 2), SPACING_MM, PARAMS, search_radius_mm=5.0).any()


def test_iteration_reestimates_the_model_from_a_poor_first_guess():
    image, lesion, _ = scene("beside")
    guess = IntensityModel(lesion=330.0, surround=TISSUE, lesion_sd=30.0, dark=60.0, floor=TISSUE)
    region, model, history = iterate_segmentation(image, guess, SEED_IJK, SPACING_MM, PARAMS, 5.0)
    assert abs(model.lesion - LESION) < 15
    assert len(history) >= 2 and history[-1]["n_voxels"] == region.sum()
    assert dice(region, lesion) > 0.85


def test_threshold_band_brackets_the_lesion_volume():
    image, lesion, _ = scene("beside")
    region = band_segmentation(image, MODEL, SEED_IJK, SPACING_MM, PARAMS, search_radius_mm=5.0)
    voxel_ml = float(np.prod(SPACING_MM)) / 1000
    stricter, looser = threshold_band_ml(image, MODEL, region, SPACING_MM, PARAMS, voxel_ml)
    true_ml = lesion.sum() * voxel_ml
    assert 0 < looser - stricter < 0.3 * true_ml
    assert 0.8 * true_ml < stricter < looser < 1.2 * true_ml
    assert threshold_band_ml(image, MODEL, np.zeros_like(region), SPACING_MM, PARAMS, voxel_ml) == []


def test_interior_sd_contrast_is_the_texture_about_a_trend_in_contrasts():
    """A bias-field ramp across a flat region is not texture; noise and texture are, in lesion contrasts."""
    rng = np.random.default_rng(0)
    region = np.zeros((20, 20, 10), bool)
    region[3:17, 3:17, 2:8] = True
    ramp = 5.0 * np.indices(region.shape)[0]  # a trend of 70 over the region
    noise = rng.normal(0, 4.0, region.shape)
    flat = interior_sd_contrast(LESION + ramp + noise, region, MODEL)
    assert abs(flat - 4.0 / (LESION - TISSUE)) < 0.005, flat
    textured = interior_sd_contrast(LESION + ramp + noise + rng.normal(0, 25.0, region.shape), region, MODEL)
    assert textured > 0.1 > flat
    assert interior_sd_contrast(LESION + noise, np.pad(np.ones((3, 3, 3), bool), 2), MODEL) is None  # 1 voxel inside
