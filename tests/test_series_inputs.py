"""Inputs that must never pass silently: seeds off the lesion, disagreeing sform/qform, too few slices.

Each case runs the workflow's per-series path (:func:`khe_vol.series.measure_series`)
on real NIfTI files written to a tmp dir.
"""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
from conftest import make_affine, rotation, save_nifti
from scipy import ndimage

from khe_vol.synthetic.anatomy import make_anatomy
from khe_vol.synthetic.render import render_labels, render_series
from khe_vol.synthetic.seeds import reader_seeds_ras_mm
from khe_vol.synthetic.specs import FAT, FLUID, LESION, LESION_LABELS, MUSCLE, SeriesSpec, TISSUES, VESSEL
from khe_vol.geometry import voxel_sizes_mm, voxel_to_world
from khe_vol.series import measure_series, seed_fluid_problem, seed_tissue_problem
from tests.cohort import fluid_away_series, fluid_seeds_ras_mm

# As tests/test_segment.py: a small trunk field of view, 0.9 x 0.9 x 4 mm voxels.
SPEC = SeriesSpec(shape=(128, 128, 26), voxel_mm=(0.9, 0.9, 4.0), snr=18.0, bias_amplitude=0.3, rng_seed=5)


def reasons(record):
    return {item["reason"]: item["detail"] for item in record["review"]}


# -- seed in the wrong tissue ------------------------------------------------------


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    anatomy = make_anatomy(3, lesion_volume_ml=35.0)
    series = render_series(anatomy, SPEC)
    labels = render_labels(anatomy, SPEC)
    path = save_nifti(tmp_path_factory.mktemp("seed") / "sub-01_ses-baseline_T2w.nii.gz", series.image, series.affine)
    spacing = voxel_sizes_mm(series.affine)
    truth = np.isin(labels, LESION_LABELS)
    depth_mm = ndimage.distance_transform_edt(truth, sampling=spacing)
    gap_mm = ndimage.distance_transform_edt(~truth, sampling=spacing)
    return series, labels, path, depth_mm, gap_mm


def _measure(scene, ijk):
    series, _, path, _, _ = scene
    record, mask, _ = measure_series("sub-01", "ses-baseline", 0, path, seed_ras_mm=voxel_to_world(ijk, series.affine))
    assert record["status"] == "ok", record["message"]
    return record, mask


@pytest.mark.parametrize("tissue", [VESSEL, FAT, MUSCLE])
def test_seed_beside_the_lesion_is_flagged(scene, tissue):
    _, labels, _, _, gap_mm = scene
    # The voxel of that tissue 2-5 mm outside the lesion nearest its centre: close
    # enough that the segmentation still finds a lesion from it.
    candidates = np.argwhere((labels == tissue) & (gap_mm >= 2) & (gap_mm <= 5))
    centre = np.argwhere(np.isin(labels, LESION_LABELS)).mean(axis=0)
    ijk = candidates[np.argmin(np.linalg.norm(candidates - centre, axis=1))]
    record, _ = _measure(scene, ijk)
    assert "seed_not_in_lesion_tissue" in reasons(record), (TISSUES[tissue], record["review"])


def test_reader_seeds_in_bright_lesion_tissue_are_not_flagged(scene):
    _, labels, _, depth_mm, _ = scene
    # As a reader clicks: anywhere in bright lesion tissue, at least 3 mm inside.
    candidates = np.argwhere((labels == LESION) & (depth_mm >= 3))
    rng = np.random.default_rng(11)
    for ijk in candidates[rng.choice(len(candidates), size=3, replace=False)]:
        record, mask = _measure(scene, ijk)
        assert mask[tuple(ijk)]
        assert "seed_not_in_lesion_tissue" not in reasons(record), (tuple(ijk), record["review"])
        # the fluid beside this lesion does not make a seed in the lesion a seed on fluid
        assert "seed_on_fluid" not in reasons(record), (tuple(ijk), record["review"])


def test_seed_on_the_fluid_beside_the_lesion_is_flagged(scene):
    series, labels, path, _, _ = scene
    fluid = labels == FLUID
    depth_mm = ndimage.distance_transform_edt(fluid, sampling=voxel_sizes_mm(series.affine))
    candidates = np.argwhere(fluid & (depth_mm >= 2))
    ijk = candidates[np.random.default_rng(4).integers(len(candidates))]
    record, _, _ = measure_series("sub-01", "ses-baseline", 0, path, seed_ras_mm=voxel_to_world(ijk, series.affine))
    assert "seed_on_fluid" in reasons(record), (tuple(ijk), record["review"])


def test_seed_on_fluid_joined_to_a_slice_of_the_lesion_is_flagged(tmp_path):
    """A seed in fluid touching the lesion fits the intensity model to the fluid: the structure segmented is
    the fluid with a slice of the lesion joined to it (11 mL of a 55 mL lesion), neither flat nor missing the
    seed; the model of its darker part (the lesion's) calls the seed's tissue fluid. Before: no reason at all."""
    anatomy = make_anatomy(2)
    series = render_series(anatomy, SPEC)
    labels = render_labels(anatomy, SPEC)
    path = save_nifti(tmp_path / "sub-01_ses-baseline_T2w.nii.gz", series.image, series.affine)
    seed = reader_seeds_ras_mm(labels == FLUID, series.affine, np.random.default_rng(2), 1, min_depth_mm=2.0)[0]
    record, mask, _ = measure_series("sub-01", "ses-baseline", 0, path, seed_ras_mm=seed)
    assert record["volume_ml"] < 0.5 * series.true_volume_ml and mask[labels == LESION].any()
    assert "calls fluid" in reasons(record).get("seed_on_fluid", ""), record["review"]


@pytest.fixture(scope="module")
def fluid_away(tmp_path_factory):
    """Issue 25's phantom: a 60 mL lesion and a round fluid collection 19 mm from it."""
    anatomy, spec, series = fluid_away_series()
    path = save_nifti(tmp_path_factory.mktemp("fluid_away") / "sub-01_ses-baseline_T2w.nii.gz",
                      np.asarray(series.image, np.float32), series.affine)
    return anatomy, spec, series, path


def test_seed_anywhere_in_a_fluid_collection_is_flagged_and_its_followup_too(fluid_away, tmp_path):
    """Before: the collection was segmented as the lesion (8 mL for 60 mL) with no review reason at all."""
    anatomy, spec, series, path = fluid_away
    for seed in fluid_seeds_ras_mm(anatomy, spec, series, np.random.default_rng(2), n_seeds=2):
        record, mask, _ = measure_series("sub-01", "ses-baseline", 0, path, seed_ras_mm=seed)
        assert record["status"] == "ok" and record["volume_ml"] < 15, record["volume_ml"]
        assert "as flat as fluid" in reasons(record).get("seed_on_fluid", ""), record["review"]
    _, _, follow = fluid_away_series(volume_ratio=0.7, rng_seed=6)
    follow_path = save_nifti(tmp_path / "sub-01_ses-m12_T2w.nii.gz", np.asarray(follow.image, np.float32),
                             follow.affine)
    tracked, _, _ = measure_series("sub-01", "ses-m12", 12, follow_path, reference={"record": record, "mask": mask})
    assert tracked["status"] == "ok"
    assert "tracked from ses-baseline" in reasons(tracked).get("seed_on_fluid", ""), tracked["review"]


def test_reader_seeds_in_the_lesion_beside_a_fluid_collection_are_not_flagged(fluid_away):
    _, _, series, path = fluid_away
    for seed in reader_seeds_ras_mm(series.truth_mask, series.affine, np.random.default_rng(3), n_seeds=2):
        record, _, _ = measure_series("sub-01", "ses-baseline", 0, path, seed_ras_mm=seed)
        assert record["volume_ml"] == pytest.approx(series.true_volume_ml, rel=0.05)
        assert "seed_on_fluid" not in reasons(record), record["review"]


def test_seed_fluid_problem_rules():
    assert seed_fluid_problem(False, 0.12) is None
    assert seed_fluid_problem(False, None) is None
    assert "as flat as fluid" in seed_fluid_problem(False, 0.01)
    assert "calls fluid" in seed_fluid_problem(True, 0.12)


def test_seed_tissue_problem_rules():
    assert seed_tissue_problem(300.0, 235.0, 410.0, True) is None
    assert "below the lesion band 235 to 410" in seed_tissue_problem(120.0, 235.0, 410.0, True)
    assert "not in the segmented lesion" in seed_tissue_problem(300.0, 235.0, 410.0, False)
    assert "not in the segmented lesion" in seed_tissue_problem(480.0, 235.0, 410.0, False)


# -- sform and qform ----------------------------------------------------------------


def test_sform_and_qform_38_mm_apart_are_flagged(tmp_path, ball_series):
    _, data, affine, inside = ball_series
    moved = affine.copy()
    moved[:3, 3] += [38.0, 0.0, 0.0]
    path = tmp_path / "two_frames_T2w.nii.gz"
    img = nib.Nifti1Image(data, None)
    img.set_sform(affine, code=1)
    img.set_qform(moved, code=1)
    nib.save(img, path)
    seed = [0.0, 0.0, 0.0]  # the ball's centre in the sform's frame
    record, mask, used = measure_series("sub-01", "ses-baseline", 0, path, seed_ras_mm=seed)
    assert record["status"] == "ok", record["message"]
    assert record["affine_source"] == "sform" and np.allclose(used, affine)
    detail = reasons(record)["geometry_disagrees"]
    assert "38.0 mm" in detail and "0.0 degrees" in detail and "sform" in detail and str(path) in detail
    # A header whose two frames agree (float32 rounding only) is not flagged.
    record, _, _ = measure_series("sub-01", "ses-baseline", 0, save_nifti(tmp_path / "ok_T2w.nii.gz", data, affine),
                                  seed_ras_mm=seed)
    assert record["status"] == "ok" and "geometry_disagrees" not in reasons(record)


def test_reader_mask_with_rotated_qform_is_flagged(tmp_path, ball_series):
    series_path, _, affine, inside = ball_series
    turned = affine.copy()
    turned[:3, :3] = rotation("z", 5) @ affine[:3, :3]
    img = nib.Nifti1Image(inside.astype(np.uint8), None)
    img.set_sform(affine, code=2)
    img.set_qform(turned, code=1)
    mask_path = tmp_path / "sub-01_ses-baseline_label-lesion_mask.nii.gz"
    nib.save(img, mask_path)
    record, _, _ = measure_series("sub-01", "ses-baseline", 0, series_path, reader_mask_path=mask_path)
    assert record["status"] == "ok", record["message"]
    detail = reasons(record)["geometry_disagrees"]
    assert f"reader mask {mask_path}" in detail and "5.0 degrees" in detail


# -- too few slices -----------------------------------------------------------------


@pytest.mark.parametrize(("shape", "message"), [
    ((40, 40, 1), r"one slice \(shape \(40, 40, 1\)\): a 3D volume is needed"),
    ((40, 40), r"one slice \(a 2D image of shape \(40, 40\)\): a 3D volume is needed"),
    ((40, 1, 12), r"one slice .*: a 3D volume is needed"),
    ((40, 40, 2), r"only 2 slices along array axis 2 .*at least 3 slices"),
    # Five 3 mm slices are a volume. The bias-field fit keeps every slice of so thin a stack
    # (n4_min_samples), so it is the noise image's lack of a lesion that is reported...
    ((40, 40, 5), r"no hyperintense tissue within 10 mm of the seed"),
    # ...but a fit told to shrink it to 8 mm voxels is refused before ITK fails with a raw error.
    ((40, 40, 5, {"n4_min_samples": 1}), r"covers only 15.0 mm along array axis 2 \(5 slices\); .*needs at least 18 mm"),
])
def test_too_few_slices_is_a_clear_error(tmp_path, shape, message):
    shape, overrides = (shape[:3], shape[3]) if isinstance(shape[-1], dict) else (shape, None)
    rng = np.random.default_rng(0)
    data = (100 + 200 * rng.random(shape)).astype(np.float32)
    path = save_nifti(tmp_path / "thin_T2w.nii.gz", data, make_affine((1, 1, 3), (-20, -20, -6)))
    record, mask, _ = measure_series("sub-01", "ses-baseline", 0, path, seed_ras_mm=[0.0, 0.0, 0.0],
                                     params_overrides=overrides)
    assert record["status"] == "error" and mask is None
    assert record["message"].startswith(f"{path}: ")
    assert "unexpected failure" not in record["message"]
    assert re.search(message, record["message"]), record["message"]
