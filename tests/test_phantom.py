"""The synthetic KHE cohort: exact truth, realistic contrast, honest geometry."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from khe_vol import phantom as ph
from khe_vol.geometry import seed_voxel, voxel_volume_mm3
from khe_vol.response import CATEGORIES, COMPLETE, GROWTH, NEARLY_COMPLETE, NO_CHANGE, PARTIAL


def read_tsv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default six-participant demo study, written once for this module."""
    out = tmp_path_factory.mktemp("demo")
    return out, ph.write_demo_cohort(out)


@pytest.fixture(scope="module")
def anatomy():
    return ph.make_anatomy(11, lesion_volume_ml=60.0)


def _interior(mask):
    return ndimage.binary_erosion(mask)


# -- the written study -------------------------------------------------------


def test_demo_layout_and_headers(demo):
    out, written = demo
    assert len(written["series"]) == 18 and len(written["truth_masks"]) == 18
    for (pid, sid), path in written["series"].items():
        assert path == out / "imaging" / pid / sid / "anat" / f"{pid}_{sid}_T2w.nii.gz"
        img = nib.load(path)
        assert img.ndim == 3 and img.shape == (160, 160, 30)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert b"phantom" in img.header["descrip"].tobytes()
        np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-4)
        mask = nib.load(written["truth_masks"][(pid, sid)])
        assert mask.get_data_dtype() == np.uint8
        np.testing.assert_allclose(mask.affine, img.affine, atol=1e-5)
        zooms = img.header.get_zooms()
        assert 0.8 <= min(zooms) <= 1.0 and 3.0 <= max(zooms) <= 4.0  # anisotropic


def test_demo_truth_table_covers_every_category(demo):
    out, written = demo
    rows = read_tsv(written["truth"])
    assert list(rows[0]) == ["participant_id", "session_id", "month", "true_volume_ml",
                             "true_percent_change", "true_category"]
    assert len(rows) == 18
    baselines = {r["participant_id"]: float(r["true_volume_ml"]) for r in rows if r["month"] == "0"}
    assert all(30 <= v <= 150 for v in baselines.values())
    m12 = {r["participant_id"]: r for r in rows if r["session_id"] == "ses-m12"}
    assert {r["true_category"] for r in m12.values()} == set(CATEGORIES)
    for r in rows:
        if r["month"] == "0":
            assert (r["true_percent_change"], r["true_category"]) == ("n/a", "n/a")
            continue
        change = float(r["true_percent_change"])
        ratio = float(r["true_volume_ml"]) / baselines[r["participant_id"]]
        assert ratio * 100 - 100 == pytest.approx(change, abs=0.01)
        # Far from the 20 / 75 % thresholds, so any sound measurement agrees.
        if r["session_id"] == "ses-m12" and r["true_category"] != COMPLETE:
            assert min(abs(change - t) for t in (20, -20, -75)) >= 10
        expected = (GROWTH if change >= 20 else NO_CHANGE if change > -20 else
                    PARTIAL if change > -75 else NEARLY_COMPLETE if change > -100 else COMPLETE)
        assert r["true_category"] == expected


def test_demo_masks_match_true_volumes_and_hold_the_seeds(demo):
    out, written = demo
    rows = read_tsv(written["truth"])
    seeds = {r["participant_id"]: [float(r[c]) for c in "xyz"] for r in read_tsv(written["seeds"])}
    assert len(seeds) == 6
    for r in rows:
        key = (r["participant_id"], r["session_id"])
        m = nib.load(written["truth_masks"][key])
        mask = np.asarray(m.dataobj)
        true_ml = float(r["true_volume_ml"])
        grid_ml = mask.sum() * voxel_volume_mm3(m.affine) / 1000
        if true_ml == 0:
            assert grid_ml == 0
            continue
        assert grid_ml == pytest.approx(true_ml, rel=0.03)
        # The lesion stays inside the field of view at every session.
        assert not any(np.take(mask, i, axis=a).any() for a in range(3) for i in (0, -1))
        if r["month"] == "0":
            ijk = seed_voxel(seeds[r["participant_id"]], m.affine, mask.shape)
            assert ijk is not None and mask[ijk] == 1
            # Deep inside: every neighbour in the slice is lesion too.
            i, j, k = ijk
            assert mask[i - 2:i + 3, j - 2:j + 3, k].all()


def test_demo_orientations_are_what_they_claim(demo):
    out, written = demo
    aff = {key: nib.load(p).affine for key, p in written["series"].items()}
    codes = {key: nib.aff2axcodes(a) for key, a in aff.items()}
    assert codes[("sub-demo01", "ses-baseline")] == ("R", "A", "S")
    assert codes[("sub-demo02", "ses-baseline")] == ("L", "P", "S")
    assert codes[("sub-demo04", "ses-baseline")] == ("P", "S", "R")  # sagittal: slices along x
    assert np.linalg.det(aff[("sub-demo04", "ses-baseline")][:3, :3]) < 0
    # demo03 is oblique by 15 degrees: its slice normal leaves z by 15 degrees.
    normal = aff[("sub-demo03", "ses-baseline")][:3, 2]
    tilt = np.degrees(np.arccos(abs(normal[2]) / np.linalg.norm(normal)))
    assert tilt == pytest.approx(15.0, abs=0.01)
    # Repositioning: the same participant's grids differ between sessions.
    assert not np.allclose(aff[("sub-demo01", "ses-baseline")], aff[("sub-demo01", "ses-m06")], atol=1.0)


def test_demo_is_byte_identical_on_rewrite(demo, tmp_path):
    out, written = demo
    again = ph.write_demo_cohort(tmp_path, n_participants=1)
    assert set(again["series"]) == {("sub-demo01", s) for s in ("ses-baseline", "ses-m06", "ses-m12")}
    for key in again["series"]:
        assert again["series"][key].read_bytes() == written["series"][key].read_bytes()
        assert again["truth_masks"][key].read_bytes() == written["truth_masks"][key].read_bytes()
    assert read_tsv(again["seeds"])[0] == read_tsv(written["seeds"])[0]
    assert read_tsv(again["truth"]) == read_tsv(written["truth"])[:3]
    assert not list(Path(tmp_path).rglob("*.tmp"))


# -- the rendering API -------------------------------------------------------


def test_same_seed_same_image_other_seed_other_image(anatomy):
    spec = ph.SeriesSpec(shape=(96, 96, 16), rng_seed=3)
    a = ph.render_series(anatomy, spec)
    b = ph.render_series(ph.make_anatomy(11, lesion_volume_ml=60.0), spec)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.truth_mask, b.truth_mask)
    c = ph.render_series(anatomy, ph.SeriesSpec(shape=(96, 96, 16), rng_seed=4))
    assert not np.array_equal(a.image, c.image)
    assert np.array_equal(a.truth_mask, c.truth_mask)  # only noise and bias changed


def test_followup_truth_is_ratio_times_baseline(anatomy):
    base = anatomy.baseline_volume_ml
    assert base == pytest.approx(60.0, rel=0.03)
    for ratio in (1.45, 0.55, 0.12, 0.0):
        spec = ph.SeriesSpec(volume_ratio=ratio, rotation_deg=(2, -3, 1), translation_mm=(4, -6, 25))
        p = ph.render_series(anatomy, spec)
        assert p.true_volume_ml == ratio * base
        grid_ml = p.truth_mask.sum() * voxel_volume_mm3(p.affine) / 1000
        assert grid_ml == pytest.approx(ratio * base, rel=0.04, abs=1e-9)
        if ratio:
            assert p.truth_mask[seed_voxel(p.seed_ras_mm, p.affine, p.image.shape)] == 1
    # Independently: the lesion scaled by ratio**(1/3) measures ratio x the volume.
    scaled = ph._rescale_lesion_shape(anatomy.lesion, 0.55 ** (1 / 3))
    assert ph.true_lesion_volume_ml(scaled) == pytest.approx(0.55 * base, rel=0.005)


def test_true_volume_does_not_depend_on_the_grid(anatomy):
    fine = anatomy.baseline_volume_ml
    assert ph.true_lesion_volume_ml(anatomy.lesion, step_mm=0.4) == pytest.approx(fine, rel=0.005)
    # The refinement only skips cells the bound proves uniform: a plain grid agrees exactly.
    lesion = ph._rescale_lesion_shape(anatomy.lesion, 0.3)
    step = 0.4
    lo, hi = ph.lesion_bounds_mm(lesion)
    n = np.ceil((hi - lo) / (step * 8)).astype(int) * 8
    axes = [lo[a] + (np.arange(n[a]) + 0.5) * step for a in range(3)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3).astype(np.float32)
    plain_ml = np.count_nonzero(ph.lesion_sdf_mm(pts, lesion) > 0) * step**3 / 1000
    # (up to a point or two within float32 rounding of the surface)
    assert ph.true_lesion_volume_ml(lesion, step_mm=step) == pytest.approx(plain_ml, abs=2.5 * step**3 / 1000)


def test_contrast_lesion_between_muscle_and_fluid(anatomy):
    spec = ph.SeriesSpec(bias_amplitude=0.3, snr=15)
    p = ph.render_series(anatomy, spec)
    labels = ph.render_labels(anatomy, spec)
    median = {name: float(np.median(p.image[_interior(labels == ph.TISSUES.index(name))]))
              for name in ("muscle", "fat", "lesion", "fluid")}
    assert median["fat"] < median["muscle"] < median["lesion"] < median["fluid"]
    assert 2.2 < median["lesion"] / median["muscle"] < 4.0
    assert median["fluid"] / median["muscle"] > 3.5
    oedema = np.median(p.image[labels == ph.OEDEMA])
    assert median["muscle"] < oedema < median["lesion"]
    vessel = np.median(p.image[labels == ph.VESSEL])
    assert vessel > 2 * median["muscle"]  # bright enough to leak into
    # The lesion is marked in the truth exactly where its labels are.
    inside = np.isin(labels, ph.LESION_LABELS)
    assert np.array_equal(inside, p.truth_mask.astype(bool))
    # Rician background: positive, about sigma * sqrt(pi / 2).
    air = labels == ph.AIR
    assert np.mean(p.image[air]) == pytest.approx(100 / 15 * np.sqrt(np.pi / 2), rel=0.1)


def test_vessel_and_fluid_sit_next_to_the_lesion(anatomy):
    assert 0.4 <= anatomy.vessel_gap_mm <= 2.5
    assert 0.0 <= anatomy.fluid_gap_mm <= 1.0
    # Check on a 0.5 mm isotropic grid around the lesion with a distance map.
    step = 0.5
    lesion = anatomy.lesion
    lo, hi = ph.lesion_bounds_mm(lesion)
    axes = [np.arange(lesion.centre_mm[a] + lo[a] - 5, lesion.centre_mm[a] + hi[a] + 5, step) for a in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    labels = ph.tissue_labels(grid.reshape(-1, 3), anatomy).reshape(grid.shape[:3])
    dist = ndimage.distance_transform_edt(~np.isin(labels, ph.LESION_LABELS), sampling=step)
    assert 0.5 <= dist[labels == ph.VESSEL].min() <= 3.0
    assert dist[labels == ph.FLUID].min() <= 1.5
    assert (labels == ph.OEDEMA).any()


def test_lesion_gone_leaves_vessel_and_fluid(anatomy):
    spec = ph.SeriesSpec(volume_ratio=0.0)
    p = ph.render_series(anatomy, spec)
    labels = ph.render_labels(anatomy, spec)
    assert p.true_volume_ml == 0 and not p.truth_mask.any()
    assert not np.isin(labels, (*ph.LESION_LABELS, ph.OEDEMA)).any()
    assert (labels == ph.FLUID).any() and (labels == ph.VESSEL).any()


@pytest.mark.parametrize("orientation, codes", [
    ("axial_ras", ("R", "A", "S")),
    ("axial_lps", ("L", "P", "S")),
    ("sagittal", ("P", "S", "R")),
    ("coronal", ("R", "S", "A")),
])
def test_series_affine_orientation(anatomy, orientation, codes):
    spec = ph.SeriesSpec(orientation=orientation, voxel_mm=(0.8, 0.8, 3.5), rotation_deg=(3, -2, 4),
                         translation_mm=(10, -20, 35))
    aff = ph.series_affine(anatomy, spec)
    assert nib.aff2axcodes(aff) == codes
    np.testing.assert_allclose(np.linalg.norm(aff[:3, :3], axis=0), (0.8, 0.8, 3.5))
    # The field of view is centred on the lesion wherever the body lies.
    centre = aff[:3, :3] @ ((np.asarray(spec.shape) - 1) / 2) + aff[:3, 3]
    np.testing.assert_allclose(centre, ph.lesion_centre_ras_mm(anatomy, spec), atol=1e-9)


def test_oblique_affine_rotates_by_the_requested_angle(anatomy):
    spec = ph.SeriesSpec(orientation="axial_lps", oblique_deg=20, oblique_axis=(1, 0, 0))
    aff = ph.series_affine(anatomy, spec)
    assert nib.aff2axcodes(aff) == ("L", "P", "S")
    cosines = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)
    assert np.degrees(np.arccos(cosines[2, 2])) == pytest.approx(20)
    np.testing.assert_allclose(cosines.T @ cosines, np.eye(3), atol=1e-12)


def test_skipped_voxels_are_really_uniform(anatomy):
    """Voxels the renderer does not sub-sample have one tissue at every sub-sample."""
    for spec in (ph.SeriesSpec(shape=(64, 64, 12), volume_ratio=1.3),
                 ph.SeriesSpec(shape=(64, 64, 12), orientation="sagittal", oblique_deg=10, volume_ratio=0.5)):
        m = np.linalg.inv(ph.body_to_world(spec)) @ ph.series_affine(anatomy, spec)
        offsets = m[:3, :3] @ ph.subsample_offsets(spec.voxel_mm).T
        centres = m[:3, :3] @ np.indices(spec.shape).reshape(3, -1) + m[:3, 3:4]
        reach = (np.hypot(offsets[0], offsets[1]).max(), np.linalg.norm(offsets, axis=0).max())
        s = spec.volume_ratio ** (1 / 3)
        labels, mixed = ph._classify(centres, anatomy, s, reach)
        uniform = np.flatnonzero(~mixed)
        assert 0.3 < uniform.size / mixed.size < 1.0
        samples = (centres[:, uniform, None] + offsets[:, None, :]).reshape(3, -1)
        sub = ph._classify(samples, anatomy, s)[0].reshape(uniform.size, -1)
        assert (sub == labels[uniform, None]).all()


def test_partial_volume_fractions_add_up_to_the_true_volume(anatomy):
    # Everything but the lesion at muscle signal, no texture, bias or noise to
    # speak of: each voxel's value then tells the lesion fraction inside it.
    lesion = replace(anatomy.lesion, texture_amplitude=0.0, oedema_rel=1.0,
                     septum_rel=anatomy.lesion.signal_rel, void_rel=anatomy.lesion.signal_rel)
    plain = replace(anatomy, lesion=lesion, body_semi_axes_mm=np.array([400.0, 400.0]),
                    fat_rel=1.0, skin_rel=1.0, fluid_rel=1.0, vessel_rel=1.0,
                    muscle_amplitudes=np.zeros_like(anatomy.muscle_amplitudes))
    p = ph.render_series(plain, ph.SeriesSpec(snr=1e7, bias_amplitude=0.0, orientation="axial_lps",
                                              oblique_deg=12, rotation_deg=(4, 0, -3)))
    muscle, les = ph.MUSCLE_SIGNAL, ph.MUSCLE_SIGNAL * lesion.signal_rel
    fraction = np.clip((p.image.astype(float) - muscle) / (les - muscle), 0, 1)
    assert fraction.sum() * voxel_volume_mm3(p.affine) / 1000 == pytest.approx(anatomy.baseline_volume_ml, rel=0.01)
    partial = (fraction > 0.05) & (fraction < 0.95)
    assert partial.sum() > 0.1 * p.truth_mask.sum()  # not a binary rendering


def test_series_spec_rejects_nonsense():
    with pytest.raises(ValueError, match="orientation"):
        ph.SeriesSpec(orientation="axial")
    with pytest.raises(ValueError, match="snr"):
        ph.SeriesSpec(snr=0)
    with pytest.raises(ValueError, match="volume_ratio"):
        ph.SeriesSpec(volume_ratio=-0.1)
    with pytest.raises(ValueError, match="voxel_mm"):
        ph.SeriesSpec(voxel_mm=(1, 1, 0))


# -- reader-placed seeds -----------------------------------------------------


def test_reader_seeds_lie_in_bright_lesion_tissue_3_mm_inside(anatomy):
    """Checked on the continuous anatomy, not on the grid the seeds were drawn from."""
    spec = ph.SeriesSpec(shape=(128, 128, 26), voxel_mm=(0.9, 0.9, 4.0), rng_seed=3)
    series = ph.render_series(anatomy, spec)
    seeds = ph.phantom_reader_seeds(anatomy, spec, series, np.random.default_rng(0), n_seeds=8)
    assert seeds.shape == (8, 3)
    body = (np.linalg.inv(series.body_to_world) @ np.c_[seeds, np.ones(8)].T)[:3].T
    assert set(ph.tissue_labels(body, anatomy)) == {ph.LESION}  # not on a septum or flow void
    # Every point within 3 mm (shells of 1, 2 and 3 mm, 300 directions) is in the lesion.
    directions = ph._fibonacci_sphere(300).T
    for point in body:
        shells = np.concatenate([point + r * directions for r in (1.0, 2.0, 3.0)])
        assert set(ph.tissue_labels(shells, anatomy)) <= set(ph.LESION_LABELS)
    # Anywhere in the lesion, not piled at its deepest point: spread over centimetres.
    assert np.linalg.norm(seeds - series.seed_ras_mm, axis=1).max() > 10.0
    assert np.linalg.norm(seeds - seeds.mean(axis=0), axis=1).mean() > 5.0
    # Reproducible from the generator.
    again = ph.phantom_reader_seeds(anatomy, spec, series, np.random.default_rng(0), n_seeds=8)
    assert np.array_equal(seeds, again)


def test_reader_seeds_refuse_a_lesion_too_thin_for_the_depth():
    mask = np.zeros((20, 20, 5), np.uint8)
    mask[5:15, 5:15, 1:4] = 1  # 3 slices of 4 mm: nothing lies 3 mm inside across the slices
    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    with pytest.raises(ValueError, match="3 mm inside"):
        ph.reader_seeds_ras_mm(mask, affine, np.random.default_rng(0))
    thick = np.zeros((20, 20, 12), np.uint8)
    thick[4:16, 4:16, 2:10] = 1
    (seed,) = ph.reader_seeds_ras_mm(thick, affine, np.random.default_rng(0))
    i, j, k = np.rint(seed / [1.0, 1.0, 4.0]).astype(int)
    # 3 mm plus half the voxel diagonal from the nearest voxel centre outside.
    assert min(i - 3, 16 - i, j - 3, 16 - j) >= 3 + 0.5 * np.sqrt(18) - 1e-9
    assert 4 * min(k - 1, 10 - k) >= 3 + 0.5 * np.sqrt(18) - 1e-9


def test_demo_seeds_are_reader_clicks_not_the_deepest_point(demo):
    _, written = demo
    seeds = {r["participant_id"]: np.array([float(r[c]) for c in "xyz"]) for r in read_tsv(written["seeds"])}
    far = []
    for index, pid in enumerate(sorted(seeds)):
        anatomy, sessions = ph.demo_participant(index)
        _, _, spec = sessions[0]
        ideal = ph.render_series(anatomy, spec).seed_ras_mm
        far.append(np.linalg.norm(seeds[pid] - ideal))
    assert np.median(far) > 5.0, far
