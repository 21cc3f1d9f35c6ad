"""Property-based tests (hypothesis) of the geometry and classification core.

Every property here is one the workflow relies on: positions survive every
change of frame, a mask moved onto a grid holding the same physical voxels is
moved exactly, voxel volume is |det| whatever the array order, and the
response category is exact at its thresholds and monotone in the ratio.

Runs are reproducible (``derandomize=True``) and small enough for CI.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from khe_vol.geometry import (
    RAS_TO_LPS,
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
from khe_vol.measure import boundary_shells_ml, lesion_volume
from khe_vol.response import (
    CATEGORIES,
    COMPLETE,
    GROWTH,
    NEARLY_COMPLETE,
    NO_CHANGE,
    PARTIAL,
    classify_change,
    classify_ratio,
    percent_change,
)
from khe_vol.segmentation.uncertainty import boundary_fraction_for, categories_within, near_threshold, volume_band_ml

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(FAST, max_examples=200)

#: Categories in increasing order of follow-up/baseline ratio.
BY_RATIO = tuple(reversed(CATEGORIES))


# --------------------------------------------------------------------------- strategies

def _rotation(q):
    """Rotation matrix of a (not necessarily unit) quaternion w, x, y, z."""
    w, x, y, z = np.asarray(q, float) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


quaternions = st.tuples(*[st.floats(-1, 1)] * 4).filter(lambda q: np.linalg.norm(q) > 0.1)
zooms = st.tuples(*[st.floats(0.2, 6.0)] * 3)
flips = st.tuples(*[st.sampled_from((-1.0, 1.0))] * 3)
origins = st.tuples(*[st.floats(-300, 300)] * 3)


@st.composite
def oblique_affines(draw):
    """Rotation x zooms x axis flips + origin: what a scanner writes (orthogonal axes)."""
    a = np.eye(4)
    a[:3, :3] = _rotation(draw(quaternions)) @ np.diag(np.multiply(draw(zooms), draw(flips)))
    a[:3, 3] = draw(origins)
    return a


@st.composite
def invertible_affines(draw):
    """Any well-conditioned affine, sheared ones included."""
    a = draw(oblique_affines())
    shear = np.eye(3)
    shear[np.triu_indices(3, 1)] = draw(st.tuples(*[st.floats(-0.5, 0.5)] * 3))
    a[:3, :3] = a[:3, :3] @ shear
    return a


@st.composite
def axis_maps(draw, shape):
    """A permutation/flip of array axes: new index -> old index as a 4x4 matrix.

    Returns ``(P, perm, flip)``; the new array is
    ``np.flip(np.transpose(old, perm), flipped axes)``.
    """
    perm = draw(st.permutations(range(3)))
    flip = draw(st.tuples(*[st.booleans()] * 3))
    new_shape = [shape[p] for p in perm]
    P = np.zeros((4, 4))
    P[3, 3] = 1
    for new_axis, old_axis in enumerate(perm):
        if flip[new_axis]:
            P[old_axis, new_axis] = -1
            P[old_axis, 3] = new_shape[new_axis] - 1
        else:
            P[old_axis, new_axis] = 1
    return P, tuple(perm), flip


def _apply_axis_map(array, perm, flip):
    out = np.transpose(array, perm)
    return np.flip(out, [ax for ax in range(3) if flip[ax]]) if any(flip) else out


shapes = st.tuples(*[st.integers(1, 7)] * 3)


@st.composite
def masks(draw, shape=None):
    shape = shape or draw(shapes)
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.sampled_from((0.0, 0.1, 0.5, 1.0)))
    return (np.random.default_rng(seed).random(shape) < density).astype(np.uint8)


# --------------------------------------------------------------------------- geometry

@FAST
@given(affine=invertible_affines(),
       ijk=st.lists(st.tuples(*[st.floats(-500, 500)] * 3), min_size=1, max_size=8))
def test_world_voxel_round_trip(affine, ijk):
    ijk = np.array(ijk)
    world = voxel_to_world(ijk, affine)
    assert np.allclose(world_to_voxel(world, affine), ijk, atol=1e-7 * (1 + np.abs(ijk).max()) * np.linalg.cond(affine))
    assert np.allclose(voxel_to_world(world_to_voxel(world, affine), affine), world,
                       atol=1e-7 * (1 + np.abs(world).max()) * np.linalg.cond(affine))
    # A single point and a batch agree.
    assert np.allclose(world_to_voxel(world[0], affine), world_to_voxel(world, affine)[0])


@FAST
@given(affine=invertible_affines(), shape=shapes,
       offsets=st.lists(st.tuples(*[st.floats(-0.49, 0.49)] * 3), min_size=1, max_size=4),
       ijk=st.lists(st.tuples(*[st.integers(-3, 9)] * 3), min_size=1, max_size=6))
def test_seed_voxel_is_rounded_world_to_voxel_within_bounds(affine, shape, offsets, ijk):
    for centre, off in itertools.product(ijk, offsets):
        point = voxel_to_world(np.add(centre, off), affine)
        got = seed_voxel(point, affine, shape)
        inside = all(0 <= c < n for c, n in zip(centre, shape))
        # Any point within half a voxel (in index space) of a centre is that centre's.
        assert got == (tuple(centre) if inside else None)
        expected = np.rint(world_to_voxel(point, affine)).astype(int)
        assert got is None or got == tuple(int(v) for v in expected)
    # The spatial shape is what counts: a trailing 4th axis changes nothing.
    point = voxel_to_world(ijk[0], affine)
    assert seed_voxel(point, affine, (*shape, 5)) == seed_voxel(point, affine, shape)


@FAST
@given(data=st.data(), affine=invertible_affines(), mask=masks())
def test_resample_onto_permuted_flipped_same_grid_is_exact(data, affine, mask):
    P, perm, flip = data.draw(axis_maps(mask.shape))
    target_affine = affine @ P  # the same physical voxels, stored in another array order
    target_shape = tuple(mask.shape[p] for p in perm)
    on_target = resample_mask_to_grid(mask, affine, target_shape, target_affine)
    assert on_target.dtype == np.uint8 and on_target.shape == target_shape
    assert np.array_equal(on_target, _apply_axis_map(mask, perm, flip))
    # Volume is preserved to the last voxel, and the way back is exact too.
    assert lesion_volume(on_target, target_affine)["n_voxels"] == lesion_volume(mask, affine)["n_voxels"]
    assert lesion_volume(on_target, target_affine)["volume_ml"] == pytest.approx(
        lesion_volume(mask, affine)["volume_ml"], rel=1e-12)
    assert np.array_equal(resample_mask_to_grid(on_target, target_affine, mask.shape, affine), mask)
    assert grids_overlap(mask.shape, affine, target_shape, target_affine)


@FAST
@given(data=st.data(), affine=oblique_affines(), mask=masks(), label=st.integers(1, 255))
def test_resample_treats_any_nonzero_label_as_lesion(data, affine, mask, label):
    on_grid = resample_mask_to_grid(mask * label, affine, mask.shape, affine)
    assert np.array_equal(on_grid, mask)


@QUICK
@given(data=st.data(), affine=invertible_affines(), shape=shapes)
def test_voxel_volume_is_abs_det_and_invariant_under_axis_order(data, affine, shape):
    v = voxel_volume_mm3(affine)
    # Edges are read to header (float32) precision, so |det| holds to 1e-6.
    assert v == pytest.approx(abs(np.linalg.det(affine[:3, :3])), rel=1e-6)
    P, _, _ = data.draw(axis_maps(shape))
    assert voxel_volume_mm3(affine @ P) == pytest.approx(v, rel=1e-12)
    assert voxel_volume_mm3(affine @ np.diag([1, 1, 1, 1.0])) == v
    # Origin does not matter; for orthogonal axes it is the product of edge lengths.
    moved = affine.copy()
    moved[:3, 3] += 1000
    assert voxel_volume_mm3(moved) == v


@FAST
@given(affine=oblique_affines())
def test_voxel_volume_is_product_of_edges_for_scanner_affines(affine):
    # Edges are read to header (float32) precision.
    assert voxel_volume_mm3(affine) == pytest.approx(np.prod(voxel_sizes_mm(affine)), rel=1e-6)


@FAST
@given(affine=oblique_affines(), mask=masks(),
       ijk=st.tuples(*[st.integers(0, 6)] * 3))
def test_sitk_round_trip_and_physical_positions(affine, mask, ijk):
    data = mask.astype(np.float32) * np.arange(mask.size, dtype=np.float32).reshape(mask.shape)
    image = to_sitk(data, affine)
    assert image.GetSize() == data.shape  # SimpleITK sizes are (i, j, k) like nibabel's shape
    back, back_affine = from_sitk(image)
    assert np.array_equal(back, data) and back.shape == data.shape
    assert np.allclose(back_affine, affine, atol=1e-9 * (1 + np.abs(affine).max()))
    # The same voxel is at the same place: RAS+ for us, LPS+ for SimpleITK.
    ijk = tuple(min(c, n - 1) for c, n in zip(ijk, data.shape))
    lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
    assert np.allclose(lps, RAS_TO_LPS @ voxel_to_world(ijk, affine), atol=1e-6)
    assert image.GetPixel(*ijk) == data[ijk]


# --------------------------------------------------------------------------- classification

ratios = st.fractions(min_value=0, max_value=10, max_denominator=10**6)
THRESHOLDS = [(Fraction(0), COMPLETE), (Fraction(1, 4), NEARLY_COMPLETE),
              (Fraction(4, 5), PARTIAL), (Fraction(6, 5), GROWTH)]


@QUICK
@given(a=ratios, b=ratios)
def test_classify_ratio_is_monotone(a, b):
    lo, hi = sorted((a, b))
    assert BY_RATIO.index(classify_ratio(lo)) <= BY_RATIO.index(classify_ratio(hi))


@QUICK
@given(eps=st.fractions(min_value=0, max_value=Fraction(1, 100), max_denominator=10**12).filter(lambda e: e > 0))
def test_thresholds_are_inclusive_as_documented(eps):
    for threshold, category in THRESHOLDS:
        assert classify_ratio(threshold) == category
    assert classify_ratio(Fraction(6, 5) - eps) == NO_CHANGE
    assert classify_ratio(Fraction(4, 5) + eps) == NO_CHANGE
    assert classify_ratio(Fraction(4, 5) - eps) == PARTIAL
    assert classify_ratio(Fraction(1, 4) + eps) == PARTIAL
    assert classify_ratio(Fraction(1, 4) - eps) == NEARLY_COMPLETE
    assert classify_ratio(eps) == NEARLY_COMPLETE
    assert classify_ratio(1 + eps) == NO_CHANGE and classify_ratio(1 - eps) == NO_CHANGE
    with pytest.raises(ValueError):
        classify_ratio(-eps)


# Voxel volumes as a header states them: short decimals (0.8 x 0.8 x 4 = 2.56 mm^3).
decimal_voxel_volumes = st.integers(1, 99999).flatmap(
    lambda m: st.integers(-5, 1).map(lambda e: Fraction(m) * Fraction(10) ** e))


@QUICK
@given(vb=decimal_voxel_volumes, vf=decimal_voxel_volumes, k=st.integers(1, 6),
       threshold=st.sampled_from(THRESHOLDS[1:]))
def test_exact_threshold_on_any_decimal_voxel_size(vb, vf, k, threshold):
    """Voxel counts giving exactly -75 %, -20 % or +20 % land in the documented category."""
    ratio, category = threshold
    q = ratio * vb / vf  # n_f / n_b
    assume(q.denominator * k <= 10**9 and q.numerator * k <= 10**9)
    n_b, n_f = q.denominator * k, q.numerator * k
    got, change = classify_change(n_b, float(vb), n_f, float(vf))
    assert got == category
    assert change == 100 * (ratio - 1)
    assert classify_change(n_b, float(vb), 0, float(vf))[0] == COMPLETE


@QUICK
@given(vb=decimal_voxel_volumes, vf=decimal_voxel_volumes,
       n_b=st.integers(1, 10**6), n_f=st.integers(0, 10**6),
       scale=st.sampled_from([Fraction(10) ** e for e in range(-3, 4)] + [Fraction(2), Fraction(1, 2),
                                                                          Fraction(8), Fraction(1, 8)]))
def test_classification_invariant_to_a_common_voxel_scale(vb, vf, n_b, n_f, scale):
    """Scaling both grids' voxel volumes alike (mm^3 vs cm^3, 2x finer) changes nothing."""
    assume(len(str((vb * scale).numerator)) <= 9 and len(str((vf * scale).numerator)) <= 9)
    assert classify_change(n_b, float(vb), n_f, float(vf)) == classify_change(
        n_b, float(vb * scale), n_f, float(vf * scale))
    # ... and the category only depends on the physical volumes.
    cat, change = classify_change(n_b, float(vb), n_f, float(vf))
    assert cat == classify_ratio(Fraction(n_f) * vf / (Fraction(n_b) * vb))
    assert change == 100 * (Fraction(n_f) * vf / (Fraction(n_b) * vb) - 1)


def test_exact_threshold_between_float32_header_grids():
    # float32 stores 0.4 as 0.400000006: the voxel volume reads the edges to header precision.
    v04 = voxel_volume_mm3(np.diag([np.float32(0.4)] * 3 + [1]).astype(float))
    v08 = voxel_volume_mm3(np.diag([np.float32(0.8)] * 3 + [1]).astype(float))
    assert classify_change(20, v04, 3, v08)[0] == GROWTH  # 1.28 -> 1.536 mm^3: exactly +20 %


positive_volumes = st.fractions(min_value=Fraction(1, 10**6), max_value=10**6, max_denominator=10**6)


@QUICK
@given(a=positive_volumes, b=positive_volumes)
def test_percent_change_is_consistent_both_ways(a, b):
    ab, ba = percent_change(a, b), percent_change(b, a)
    assert (1 + ab / 100) * (1 + ba / 100) == 1  # exact: the two ratios are reciprocal
    assert (ab > 0) == (b > a) and (ab < 0) == (b < a) and (ab == 0) == (a == b)
    assert percent_change(a, a) == 0 and percent_change(a, 0) == -100
    assert ab >= -100
    with pytest.raises(ValueError):
        percent_change(0, a)


# --------------------------------------------------------------------------- bands

band_volumes = st.floats(min_value=0, max_value=500, allow_nan=False, allow_infinity=False)


@st.composite
def bands(draw, positive=False):
    point = draw(band_volumes.filter(lambda v: v > 0) if positive else band_volumes)
    lo = draw(st.floats(0, point)) if point > 0 else 0.0
    hi = draw(st.floats(point, 1000))
    return lo, point, hi


@QUICK
@given(base=bands(positive=True), follow=bands())
@example(base=(0.8, 1.0, 1.2), follow=(1.2, 1.2, 1.2))
@example(base=(0.0, 1.0, 1.5), follow=(0.0, 0.0, 0.0))
def test_categories_within_contains_the_point_and_is_contiguous(base, follow):
    b_lo, b, b_hi = base
    f_lo, f, f_hi = follow
    cats = categories_within((b_lo, b_hi), (f_lo, f_hi))
    point = classify_ratio(Fraction(f) / Fraction(b))
    assert point in cats
    idx = [BY_RATIO.index(c) for c in cats]
    assert idx == list(range(idx[0], idx[-1] + 1))  # contiguous, increasing ratio
    if not near_threshold((b_lo, b_hi), (f_lo, f_hi)):
        assert cats == (point,)
        # Same category at both extremes of the bands.
        assert classify_ratio(Fraction(f_lo) / Fraction(b_hi)) == point
        if b_lo > 0:
            assert classify_ratio(Fraction(f_hi) / Fraction(b_lo)) == point
    # Degenerate bands give exactly the point category.
    assert categories_within((b, b), (f, f)) == (point,)
    # Widening a band can only add categories.
    assert set(cats) <= set(categories_within((b_lo / 2, b_hi * 2), (f_lo / 2, f_hi * 2)))


# --------------------------------------------------------------------------- boundary shells

@QUICK
@given(data=st.data(), shape=st.tuples(*[st.integers(1, 9)] * 3), affine=oblique_affines())
def test_boundary_shells_of_a_box_are_analytic(data, shape, affine):
    lo = [data.draw(st.integers(0, n - 1)) for n in shape]
    hi = [data.draw(st.integers(l + 1, n)) for l, n in zip(lo, shape)]
    mask = np.zeros(shape, np.uint8)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    a, b, c = (h - l for l, h in zip(lo, hi))
    inner_n = a * b * c - max(a - 2, 0) * max(b - 2, 0) * max(c - 2, 0)
    face = (b * c, a * c, a * b)
    # A face of the box has an outer shell only where the grid goes on beyond it.
    outer_n = sum(face[ax] * ((lo[ax] > 0) + (hi[ax] < shape[ax])) for ax in range(3))
    v_ml = voxel_volume_mm3(affine) / 1000
    inner, outer = boundary_shells_ml(mask, affine)
    assert inner == pytest.approx(inner_n * v_ml, rel=1e-12)
    assert outer == pytest.approx(outer_n * v_ml, rel=1e-12)
    volume = lesion_volume(mask, affine)["volume_ml"]
    assert volume == pytest.approx(a * b * c * v_ml, rel=1e-12)
    low, high = volume_band_ml(mask, affine)
    assert 0 <= low <= volume <= high
    # A quarter of each shell up to 5 mm slices, more on thicker ones.
    share = boundary_fraction_for(affine)
    assert share == pytest.approx(0.25 * max(1.0, voxel_sizes_mm(affine).max() / 5.0))
    assert low == pytest.approx(max(volume - share * inner, 0), rel=1e-9, abs=1e-15)
    assert high == pytest.approx(volume + share * outer, rel=1e-9)
