"""Reader clicks steer the segmentation: the engine and the ``khe-vol segment`` command, on real NIfTI files."""

from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from khe_vol.geometry import voxel_to_world
from khe_vol.segmentation.interactive import Click, ClickSession, clicks_from_json, interior_markers, segment_clicks
from khe_vol.segmentation.params import SegmentationError
from khe_vol.segmentation.seeded import segment_from_seed
from scenes import ras_text, segment_cli

SPACING_MM = (0.8, 0.8, 3.0)
SHAPE = (112, 112, 24)


def _ball(center_mm, radius_mm):
    grids = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
    return sum((g * s - c) ** 2 for g, s, c in zip(grids, SPACING_MM, center_mm)) <= radius_mm**2


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Tissue with a 14 mm lesion holding a dark core open to one side, a separate bright lobe,
    and a brighter neighbour broadly touching the lesion; LPS-stored grid (flipped axes)."""
    rng = np.random.default_rng(5)
    centre = np.array([40.0, 45.0, 36.0])
    lesion = _ball(centre, 14.0)
    core = _ball(centre + [3.0, 0, 0], 6.0) | (_ball(centre + [9.0, 0, 0], 5.0) & lesion)
    lobe = _ball(centre + [0, 34.0, 0], 7.0)
    vessel = _ball(centre + [0.0, -19.0, 0], 7.5) & ~lesion  # a bright neighbour broadly touching it
    image = np.full(SHAPE, 200.0)
    image[lesion | lobe] = 420.0
    image[core] = 60.0
    image[vessel] = 470.0
    image = ndimage.gaussian_filter(image, (0.8, 0.8, 0.3)) + rng.normal(0, 8.0, SHAPE)
    affine = np.diag([-SPACING_MM[0], -SPACING_MM[1], SPACING_MM[2], 1.0])
    affine[:3, 3] = [40.0, 60.0, -30.0]
    path = tmp_path_factory.mktemp("scene") / "T2w.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), path)
    stored = nib.load(path)  # what the command reads: the header's float32 affine
    image, affine = np.asarray(stored.dataobj, np.float32), stored.affine

    def ras(ijk):
        return tuple(float(v) for v in voxel_to_world(ijk, affine))

    c = np.rint(centre / SPACING_MM).astype(int)
    return {
        "path": path, "image": image, "affine": affine,
        "lesion": lesion, "core": core, "lobe": lobe, "vessel": vessel,
        # where a reader clicks: in bright lesion tissue, off centre
        "seed": ras(c + [-9, 6, 0]),
        "lobe_click": ras(c + [2, 42, 1]),
        "core_click": ras(c + [5, 0, 0]),
        "vessel_click": ras(np.rint((centre + [0.0, -22.0, 0]) / SPACING_MM).astype(int)),
    }




def test_one_include_click_is_the_automatic_segmentation(scene, tmp_path):
    proc, out = segment_cli(scene["path"], tmp_path, "--include", ras_text(scene["seed"]), "--record", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    img = nib.load(out)
    assert img.get_data_dtype() == np.uint8 and img.shape == SHAPE
    assert np.allclose(img.affine, scene["affine"])
    auto, _ = segment_from_seed(scene["image"], scene["affine"], scene["seed"])
    assert np.array_equal(np.asarray(img.dataobj), auto)
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1}


def test_include_adds_a_lobe_and_a_dark_core_the_reader_says_belongs(scene):
    session = ClickSession(scene["image"], scene["affine"])
    seeded, _ = session.segment([Click("include", scene["seed"])])
    assert seeded[scene["lobe"]].mean() < 0.1  # a separate lobe is not found from the seed
    with_lobe, _ = session.segment([Click("include", scene["seed"]), Click("include", scene["lobe_click"])])
    assert with_lobe[scene["lobe"]].mean() > 0.8
    assert np.all(with_lobe >= seeded)  # an include only adds
    core_before = seeded[scene["core"] & scene["lesion"]].mean()
    with_core, _ = session.segment([Click("include", scene["seed"]), Click("include", scene["core_click"])])
    # The core joins up to the lesion's convex outline (its open mouth lies outside it).
    assert core_before < 0.2 and with_core[scene["core"] & scene["lesion"]].mean() > 0.75
    assert (with_core.astype(bool) & ~seeded.astype(bool) & ~scene["lesion"]).sum() < 20
    assert with_core[~_ball(np.array([40.0, 45.0, 36.0]), 17.0) & ~scene["vessel"]].sum() < 50  # no run-off


def test_exclude_removes_the_vessel_and_keeps_the_lesion(scene):
    seed = Click("include", scene["seed"])
    mask, _ = segment_clicks(scene["image"], scene["affine"], [seed])
    assert mask[scene["vessel"]].mean() > 0.5, "the scene should make the automatic mask take the vessel"
    cut, _ = segment_clicks(scene["image"], scene["affine"], [seed, Click("exclude", scene["vessel_click"])])
    assert cut[scene["vessel"]].mean() < 0.2
    lesion = scene["lesion"] & ~scene["core"]
    assert cut[lesion].mean() > 0.95 * mask[lesion].mean()
    assert np.all(cut <= mask)  # an exclude only removes


def test_exclude_outside_the_mask_is_a_barrier_for_later_includes(scene):
    seed = Click("include", scene["seed"])
    outside = Click("exclude", scene["lobe_click"])
    mask, _ = segment_clicks(scene["image"], scene["affine"], [seed, outside, Click("include", scene["lobe_click"])])
    ijk = tuple(int(v) for v in np.rint(np.linalg.solve(scene["affine"], [*scene["lobe_click"], 1.0])[:3]))
    # the include lands on the excluded point itself: the later click wins there, and the lobe joins
    assert mask[ijk] == 1
    near = Click("exclude", tuple(np.asarray(scene["lobe_click"]) + [0.0, 4.0, 0.0]))
    mask, _ = segment_clicks(scene["image"], scene["affine"], [seed, near, Click("include", scene["lobe_click"])])
    ijk_near = tuple(int(v) for v in np.rint(np.linalg.solve(scene["affine"], [*near.ras_mm, 1.0])[:3]))
    assert mask[ijk] == 1 and mask[ijk_near] == 0


def test_start_mask_and_clicks_in_order_from_the_command_line(scene, tmp_path):
    start = tmp_path / "start.nii.gz"
    nib.save(nib.Nifti1Image((scene["lesion"] | scene["vessel"]).astype(np.uint8), scene["affine"]), start)
    proc, out = segment_cli(scene["path"], tmp_path, "--start-mask", str(start), "--exclude", ras_text(scene["vessel_click"]),
                             "--include", ras_text(scene["lobe_click"]))
    assert proc.returncode == 0, proc.stderr
    mask = np.asarray(nib.load(out).dataobj)
    assert mask[scene["vessel"]].mean() < 0.2 and mask[scene["lobe"]].mean() > 0.8
    assert mask[scene["lesion"]].mean() > 0.9


def test_same_clicks_same_bytes_on_any_thread_count(scene, tmp_path):
    args = ["--include", ras_text(scene["seed"]), "--exclude", ras_text(scene["vessel_click"]),
            "--include", ras_text(scene["core_click"])]
    a, out_a = segment_cli(scene["path"], tmp_path, *args, name="a.nii.gz")
    b, out_b = segment_cli(scene["path"], tmp_path, *args, name="b.nii.gz")
    assert a.returncode == b.returncode == 0
    assert out_a.read_bytes() == out_b.read_bytes()
    clicks = [Click("include", scene["seed"]), Click("exclude", scene["vessel_click"])]
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        one, _ = segment_clicks(scene["image"], scene["affine"], clicks)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
        two, _ = segment_clicks(scene["image"], scene["affine"], clicks)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    assert np.array_equal(one, two)


def test_a_session_gives_what_a_fresh_segmentation_gives_after_undo(scene):
    clicks = [Click("include", scene["seed"]), Click("exclude", scene["vessel_click"]),
              Click("include", scene["lobe_click"])]
    session = ClickSession(scene["image"], scene["affine"])
    session.segment(clicks)
    undone, info = session.segment(clicks[:2])
    fresh, _ = segment_clicks(scene["image"], scene["affine"], clicks[:2])
    assert np.array_equal(undone, fresh) and info["n_clicks"] == 2


def test_bad_clicks_say_what_is_wrong(scene, tmp_path):
    proc, _ = segment_cli(scene["path"], tmp_path, "--exclude", ras_text(scene["seed"]))
    assert proc.returncode == 1 and "first click must be an include" in proc.stderr
    proc, _ = segment_cli(scene["path"], tmp_path, "--include", "900,900,900")
    assert proc.returncode == 1 and "outside the image" in proc.stderr
    proc, _ = segment_cli(scene["path"], tmp_path, "--include", "1,2")
    assert proc.returncode == 2 and "X,Y,Z" in proc.stderr
    with pytest.raises(SegmentationError, match="first click must be an include"):
        segment_clicks(scene["image"], scene["affine"], [])
    for bad in ([{"kind": "include"}], [{"kind": "grow", "ras_mm": [1, 2, 3]}],
                [{"kind": "include", "ras_mm": [1, 2, float("nan")]}], {"kind": "include"},
                [{"kind": "include", "ras_mm": [True, 2, 3]}]):
        with pytest.raises(ValueError):
            clicks_from_json(bad)


def test_an_exclude_on_a_dim_halo_removes_it_around_the_whole_lesion(tmp_path):
    """A start mask holding a lesion and the dimmer oedema-like halo around all of it, as the
    classical engine takes it on a real sarcoma: one exclude on the halo, on one side, takes the
    halo off every side and every slice and keeps the lesion."""
    rng = np.random.default_rng(11)
    centre = np.array([45.0, 45.0, 36.0])
    lesion = _ball(centre, 13.0)
    halo = _ball(centre, 18.0) & ~lesion
    image = np.full(SHAPE, 200.0)
    image[halo] = 290.0
    image[lesion] = 430.0
    image = ndimage.gaussian_filter(image, (0.8, 0.8, 0.3)) + rng.normal(0, 8.0, SHAPE)
    affine = np.diag([SPACING_MM[0], SPACING_MM[1], SPACING_MM[2], 1.0])
    start = lesion | halo
    click_ijk = np.rint((centre + [-15.5, 0.0, 0.0]) / SPACING_MM).astype(int)  # in the halo, on the left
    click = Click("exclude", tuple(float(v) for v in voxel_to_world(click_ijk, affine)))
    mask, _ = segment_clicks(image.astype(np.float32), affine, [click], start_mask=start)
    mask = mask.astype(bool)
    # The lesion's partial-volume rim stays (the image is blurred over about a voxel): the halo
    # counted is the part more than 2 mm outside the lesion.
    halo = halo & ~_ball(centre, 15.0)
    far_side = halo & (np.arange(SHAPE[0])[:, None, None] * SPACING_MM[0] > centre[0] + 8.0)
    assert mask[far_side].mean() < 0.1, "the halo on the far side of the lesion stays"
    assert mask[halo].mean() < 0.1
    core = _ball(centre, 11.5)
    assert mask[core].mean() > 0.99, "the lesion went with its halo"


def test_a_click_on_an_empty_start_mask_seeds(scene):
    """A 0 mL proposal is no mask: the first include seeds, as without one."""
    empty = np.zeros(SHAPE, np.uint8)
    seeded, info = segment_clicks(scene["image"], scene["affine"], [Click("include", scene["seed"])],
                                  start_mask=empty)
    auto, _ = segment_from_seed(scene["image"], scene["affine"], scene["seed"])
    assert info["start"] == "seed" and np.array_equal(seeded, auto)
    with pytest.raises(SegmentationError, match="first click must be an include"):
        segment_clicks(scene["image"], scene["affine"], [Click("exclude", scene["seed"])], start_mask=empty)


def test_interior_markers_are_the_deepest_voxel_of_each_part_measured_as_on_the_whole_array():
    """One marker per part, at its largest distance to the border (mm; the array's own edge is no border),
    the first in C order among equals."""
    rng = np.random.default_rng(3)
    for _ in range(40):
        region = rng.random(tuple(rng.integers(4, 16, 3))) < rng.uniform(0.4, 0.9)
        spacing = tuple(rng.choice([0.5, 1.0, 4.0], 3))
        labels, n = ndimage.label(region)
        depth = ndimage.distance_transform_edt(region, sampling=spacing)
        expected = []
        for i in range(1, n + 1):
            inside = np.where(labels == i, depth, -1.0)
            expected.append(tuple(int(v) for v in np.unravel_index(np.argmax(inside), inside.shape)))
        assert interior_markers(region, spacing) == expected
    assert interior_markers(np.zeros((3, 3, 3), bool), (1, 1, 1)) == []


def test_prepare_does_all_the_first_click_needs_of_a_start_mask():
    """Issue 24 (6): the page's prepare computes the start mask's region and markers, so the first click,
    which waits for the prepare, does not compute them after it."""
    image = (100 + np.random.default_rng(0).normal(0, 5, (40, 40, 12))).astype(np.float32)
    image[12:28, 12:28, 3:9] += 200
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    session = ClickSession(image, affine, image > 200, volume_band=False)
    session.prepare()
    assert session._mask_roi is not None and session._mask_markers is not None
    prepared = session._mask_markers
    mask, info = session.segment([Click("include", tuple(voxel_to_world(np.array([[20, 20, 6]]), affine)[0]))])
    assert session._mask_markers is prepared and info["start"] == "mask" and mask.sum() >= (image > 200).sum()
