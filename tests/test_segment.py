"""Seeded segmentation and follow-up tracking on synthetic fat-suppressed T2 series.

Every scene comes from :mod:`khe_vol.synthetic`: a lobulated, heterogeneous
lesion with dark septa and flow voids, a bright vessel and a very bright
fluid collection touching it after partial volume, a partial oedema rim, a
smooth bias field and Rician noise, on anisotropic grids.
"""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from khe_vol.synthetic.anatomy import make_anatomy
from khe_vol.synthetic.render import body_to_world, lesion_centre_ras_mm, lesion_fits_fov, render_labels, render_series
from khe_vol.synthetic.seeds import phantom_reader_seeds
from khe_vol.synthetic.specs import FLOW_VOID, FLUID, SEPTUM, SeriesSpec, VESSEL
from khe_vol.geometry import resample_mask_to_grid, voxel_sizes_mm, voxel_volume_mm3
from khe_vol.overlap import dice
from khe_vol.segmentation.intensity import correct_bias
from khe_vol.segmentation.morphology import dilate_mm, erode_mm
from khe_vol.segmentation.params import ENGINES, SegmentationError, SegmentationParams
from khe_vol.segmentation.seeded import segment_from_seed
from khe_vol.segmentation.track import register_rigid, track_followup
from khe_vol.series import measure_series

# A small trunk field of view keeps every test quick; 0.9 x 0.9 x 4 mm voxels.
SPEC = SeriesSpec(shape=(128, 128, 26), voxel_mm=(0.9, 0.9, 4.0), snr=18.0, bias_amplitude=0.3, rng_seed=5)


def volume_ml(mask, affine):
    return np.count_nonzero(mask) * voxel_volume_mm3(affine) / 1000.0


@pytest.fixture(scope="module")
def anatomy():
    return make_anatomy(3, lesion_volume_ml=35.0)


def reader_seed(anatomy, spec, series, rng_seed=1):
    """A seed where a reader would click: bright lesion tissue >= 3 mm inside, not the deepest point."""
    return phantom_reader_seeds(anatomy, spec, series, np.random.default_rng(rng_seed))[0]


@pytest.fixture(scope="module")
def baseline(anatomy):
    """The baseline series, its tissue labels, the segmentation from a reader's seed, and that seed."""
    assert lesion_fits_fov(anatomy, SPEC)
    series = render_series(anatomy, SPEC)
    seed = reader_seed(anatomy, SPEC, series)
    mask, info = segment_from_seed(series.image, series.affine, seed)
    return series, render_labels(anatomy, SPEC), mask, info, seed


# -- baseline segmentation ---------------------------------------------------


def test_baseline_matches_truth(baseline):
    series, _, mask, info, _ = baseline
    assert mask.shape == series.image.shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    assert dice(mask, series.truth_mask) >= 0.93
    got = volume_ml(mask, series.affine)
    assert got == pytest.approx(series.true_volume_ml, rel=0.05)
    assert info["volume_ml"] == pytest.approx(got)


def test_no_leak_into_touching_vessel_or_fluid(baseline):
    series, labels, mask, _, _ = baseline
    lesion = np.count_nonzero(mask)
    # The vessel and fluid are bridged to the lesion by partial volume; at
    # most their one-voxel contact rim may be taken, never the structures.
    for tissue in (VESSEL, FLUID):
        assert np.count_nonzero(labels == tissue) > 100  # they are in the scene
        assert np.count_nonzero(mask.astype(bool) & (labels == tissue)) <= 0.01 * lesion
    # Septa and flow voids inside the lesion are lesion.
    inner = (labels == SEPTUM) | (labels == FLOW_VOID)
    assert np.count_nonzero(mask.astype(bool) & inner) >= 0.8 * np.count_nonzero(inner)


def test_info_is_json_serialisable(baseline):
    _, _, _, info, _ = baseline
    text = json.dumps(info)
    for key in ("lesion_level", "surrounding_level", "lower_threshold", "upper_threshold", "seconds"):
        assert key in info
    assert info["lower_threshold"] < info["lesion_level"] < info["upper_threshold"]
    assert json.loads(text)["n_voxels"] == info["n_voxels"]


@pytest.mark.parametrize("threads", [2, 7])
def test_bias_field_does_not_depend_on_the_machine_thread_count(baseline, threads):
    """N4 sums over threads in a thread-count-dependent order; masks must not depend on the machine."""
    import SimpleITK as sitk

    series = baseline[0]
    params = SegmentationParams()
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        one, _ = correct_bias(series.image, series.affine, params)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        many, _ = correct_bias(series.image, series.affine, params)
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads  # restored after N4
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    assert one.tobytes() == many.tobytes()


def test_relabelled_grid_gives_the_same_physical_mask(baseline):
    """The same voxels stored flipped and permuted (LPS-like) give the same lesion."""
    series, _, mask, _, seed = baseline
    # New array axes (k, i, j) with i and j reversed: same voxels, other order.
    image = np.transpose(series.image[::-1, ::-1, :], (2, 0, 1))
    n_i, n_j = series.image.shape[:2]
    index_map = np.zeros((4, 4))  # new (k, i', j') -> old (i, j, k)
    index_map[0, 1], index_map[0, 3] = -1, n_i - 1
    index_map[1, 2], index_map[1, 3] = -1, n_j - 1
    index_map[2, 0] = 1
    index_map[3, 3] = 1
    affine = series.affine @ index_map
    other, _ = segment_from_seed(image, affine, seed)
    back = resample_mask_to_grid(other, affine, series.image.shape, series.affine)
    assert dice(back, mask) >= 0.99


@pytest.mark.parametrize(
    "grid",
    [dict(orientation="axial_lps", oblique_deg=12.0, oblique_axis=(1.0, 0.3, 0.0)), dict(orientation="sagittal")],
)
def test_other_grid_gives_the_same_lesion(anatomy, baseline, grid):
    """An oblique LPS or a sagittal acquisition of the same scene finds the same lesion in space."""
    series, _, mask, _, _ = baseline
    spec = replace(SPEC, rng_seed=8, **grid)
    if grid["orientation"] == "sagittal":
        spec = replace(spec, shape=(128, 110, 30))  # i posterior, j superior, k (4 mm slices) right
    assert lesion_fits_fov(anatomy, spec)
    other = render_series(anatomy, spec)
    found, _ = segment_from_seed(other.image, other.affine, reader_seed(anatomy, spec, other, rng_seed=2))
    assert dice(found, other.truth_mask) >= 0.92
    assert volume_ml(found, other.affine) == pytest.approx(volume_ml(mask, series.affine), rel=0.05)
    # Same place: compare on the baseline grid by physical position.
    on_baseline = resample_mask_to_grid(found, other.affine, series.image.shape, series.affine)
    assert dice(on_baseline, mask) >= 0.85  # resampling a 4 mm grid onto another costs a few %


# -- where the reader clicks ---------------------------------------------------


@pytest.fixture(scope="module")
def five_seeds(tmp_path_factory):
    """One phantom (true 30.0 mL) measured from five reader seeds in bright lesion tissue."""
    anatomy = make_anatomy(9104, lesion_volume_ml=30.0)
    spec = SeriesSpec(shape=(120, 120, 24), voxel_mm=(0.9, 0.9, 4.0), snr=18.0, bias_amplitude=0.3, rng_seed=3)
    series = render_series(anatomy, spec)
    path = tmp_path_factory.mktemp("five_seeds") / "ph_T2w.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(series.image, np.float32), series.affine), path)
    seeds = phantom_reader_seeds(anatomy, spec, series, np.random.default_rng(0), n_seeds=5)
    return series, [measure_series("sub-01", "ses-baseline", 0, path, seed_ras_mm=seed)[0] for seed in seeds]


@pytest.mark.xfail(strict=True, reason=(
    "known failure mode (README, Known failure modes): from one of the five seeds, among dimmer tissue, "
    "a bright lobe at the lesion's surface passes for fluid (24.7 mL; the others 29.7-30.1). Held on the "
    "N4 field of SimpleITK's Shrink, whose voxels a header change far below a voxel could swap; flagged "
    "fluid_near_lesion_level (the test below)"))
def test_volume_does_not_depend_on_where_in_the_lesion_the_seed_lies(five_seeds):
    """Five reader seeds in bright lesion tissue give one volume, the true one."""
    series, records = five_seeds
    volumes = np.array([r["volume_ml"] for r in records])
    assert (volumes.max() - volumes.min()) / np.median(volumes) <= 0.01, volumes
    assert np.median(volumes) == pytest.approx(series.true_volume_ml, rel=0.03)


def test_a_seed_that_measures_another_volume_says_why(five_seeds):
    """Every seed's volume is the true one, or its record asks for review with the reason: the
    tissue left out as fluid beside the lesion is barely brighter than the lesion."""
    series, records = five_seeds
    for record in records:
        reasons = [item["reason"] for item in record["review"]]
        if record["volume_ml"] != pytest.approx(series.true_volume_ml, rel=0.03):
            assert "fluid_near_lesion_level" in reasons, record["volume_ml"]
        else:
            assert "fluid_near_lesion_level" not in reasons, record["volume_ml"]
    assert np.median([r["volume_ml"] for r in records]) == pytest.approx(series.true_volume_ml, rel=0.03)


def test_large_field_of_view_region_is_recentred_on_the_lesion():
    """On a 288 mm field of view the region of interest (180 mm) cuts the image; it is
    re-centred on the lesion, so where it cuts does not follow the seed (before: 0.23 %
    apart over three seeds)."""
    big = make_anatomy(1, lesion_volume_ml=35.0)
    spec = SeriesSpec(shape=(320, 320, 26), voxel_mm=(0.9, 0.9, 4.0), snr=18.0, bias_amplitude=0.3,
                         rng_seed=5, fov_offset_mm=(60.0, -30.0, 0.0))
    series = render_series(big, spec)
    seeds = phantom_reader_seeds(big, spec, series, np.random.default_rng(1), n_seeds=3)
    infos = [segment_from_seed(series.image, series.affine, seed)[1] for seed in seeds]
    assert all(info["roi_recentred"] >= 1 for info in infos)
    volumes = np.array([info["volume_ml"] for info in infos])
    assert (volumes.max() - volumes.min()) / np.median(volumes) <= 0.001, volumes
    assert np.median(volumes) == pytest.approx(series.true_volume_ml, rel=0.03)


# -- errors ------------------------------------------------------------------


def test_seed_outside_the_image_raises(baseline):
    series, _, _, _, seed = baseline
    far = np.asarray(seed) + np.array([0.0, 0.0, 500.0])
    with pytest.raises(SegmentationError, match="outside the image"):
        segment_from_seed(series.image, series.affine, far)


def test_seed_on_ordinary_tissue_raises(anatomy, baseline):
    # The lesion gone (same grid and pose): the reader's seed lies on plain muscle.
    seed = baseline[4]
    empty = render_series(anatomy, replace(SPEC, volume_ratio=0.0))
    with pytest.raises(SegmentationError, match="seed"):
        segment_from_seed(empty.image, empty.affine, seed)


# -- follow-ups --------------------------------------------------------------

FOLLOW = dict(rotation_deg=(3.0, -2.0, 4.0), translation_mm=(5.0, -4.0, 9.0), rng_seed=21)


def test_register_rigid_recovers_repositioning(anatomy, baseline):
    series, _, _, _, _ = baseline
    spec = replace(SPEC, **FOLLOW)
    follow = render_series(anatomy, spec)
    _, info = register_rigid(series.image, series.affine, follow.image, follow.affine)
    # Truth: follow-up scanner -> body -> baseline scanner.
    truth = body_to_world(SPEC) @ np.linalg.inv(body_to_world(spec))
    got = np.asarray(info["fixed_to_moving_ras"])
    centre = np.append(lesion_centre_ras_mm(anatomy, spec), 1.0)
    assert np.linalg.norm((got @ centre)[:3] - (truth @ centre)[:3]) < 3.0
    json.dumps(info)


def test_followup_shrunk_by_88_percent_is_found(anatomy, baseline):
    series, _, mask, _, _ = baseline
    follow = render_series(anatomy, replace(SPEC, volume_ratio=0.12, **FOLLOW))
    found, info = track_followup(follow.image, follow.affine, series.image, series.affine, mask)
    assert found.shape == follow.image.shape and found.dtype == np.uint8
    assert info["status"] == "found"
    assert dice(found, follow.truth_mask) >= 0.85
    assert volume_ml(found, follow.affine) == pytest.approx(follow.true_volume_ml, rel=0.15)
    json.dumps(info)


def test_followup_growth_is_followed(anatomy, baseline):
    series, _, mask, _, _ = baseline
    follow = render_series(anatomy, replace(SPEC, volume_ratio=1.3, **FOLLOW))
    found, _ = track_followup(follow.image, follow.affine, series.image, series.affine, mask)
    assert dice(found, follow.truth_mask) >= 0.92
    assert volume_ml(found, follow.affine) == pytest.approx(follow.true_volume_ml, rel=0.06)


def test_vanished_lesion_gives_an_empty_mask(anatomy, baseline):
    """Complete involution: nothing found, not the vessel, the fluid or noise."""
    series, _, mask, _, _ = baseline
    follow = render_series(anatomy, replace(SPEC, volume_ratio=0.0, **FOLLOW))
    found, info = track_followup(follow.image, follow.affine, series.image, series.affine, mask)
    assert np.count_nonzero(found) == 0
    assert info["status"] == "not found" and info["volume_ml"] == 0.0


def test_followup_with_empty_reference_raises(baseline):
    series, _, _, _, _ = baseline
    with pytest.raises(SegmentationError, match="empty"):
        track_followup(series.image, series.affine, series.image, series.affine, np.zeros(series.image.shape))


# -- helpers -----------------------------------------------------------------


def test_morphology_in_millimetres_on_anisotropic_grids():
    spacing = np.array([0.5, 0.5, 4.0])
    point = np.zeros((41, 41, 9), bool)
    point[20, 20, 4] = True
    # Small balls go through a structuring element, large ones through a
    # distance transform: both are the set of voxel centres within r mm.
    for radius in (1.2, 6.0):
        ball = dilate_mm(point, spacing, radius)
        idx = np.argwhere(ball) - [20, 20, 4]
        dist = np.sqrt(((idx * spacing) ** 2).sum(axis=1))
        assert dist.max() <= radius + 1e-6
        assert ball.sum() == np.count_nonzero(
            np.sqrt((((np.indices(point.shape).T - [20, 20, 4]) * spacing) ** 2).sum(-1)) <= radius
        )
        assert erode_mm(ball, spacing, radius).sum() <= 1 + 2 * (radius >= 4.0)  # the centre (and along z)


def test_parameters_are_plain_numbers_or_the_engine_name():
    params = SegmentationParams()
    for name, value in vars(params).items():
        assert isinstance(value, (int, float, bool)) or (name == "engine" and value in ENGINES), name
    assert voxel_sizes_mm(np.diag([0.9, 0.9, 4.0, 1.0]))[2] == pytest.approx(4.0)
