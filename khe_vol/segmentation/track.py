"""Find a lesion again in a follow-up series, starting from the reference (baseline) lesion.

1. **Register** the follow-up to the reference rigidly in physical space
   (:func:`register_rigid`: SimpleITK Euler 3D transform, Mattes mutual
   information, two resolutions on copies shrunk to about
   ``registration_spacing_mm``), started from whichever of the identity (both
   series are in scanner space) and aligned field-of-view centres fits better
   (the other only if that fails).
2. **Carry** the reference lesion mask onto the follow-up grid through that
   transform (linear interpolation of the 0/1 mask, kept at >= 0.5).
3. **Relate the intensity scales** (:func:`intensity_map`): sessions come
   from different scanners, software and preprocessing, so the follow-up may
   store its intensities with another gain, an offset, the opposite sign
   (an inverted image), z-scored, or as integers with ``scl_slope`` /
   ``scl_inter``. An affine map ``reference = gain * follow-up + offset`` is
   fitted on the tissue *around* the lesion (beyond ``track_margin_mm`` of
   the carried lesion, where a grown, shrunk or vanished lesion changes
   nothing), from the two registered images: the sign from the rank
   correlation of corresponding voxels, gain and offset from their quantiles
   (a robust Theil-Sen line through them). When the follow-up is a plain
   positive rescaling of the reference (see :data:`OFFSET_TOLERANCE`) it is
   used as stored; otherwise it is expressed on the reference's scale before
   bias correction (or, when the reference has no zero to restore, e.g.
   z-scored, turned the right way up on its own scale) and
   ``info["intensity_map"]["plain_rescaling"]`` is false (review flag
   ``intensity_scale_differs``).
4. **Re-segment** on the follow-up with the band segmentation of
   :mod:`khe_vol.segmentation.band`, started from the carried lesion eroded by
   ``track_erosion_mm`` and with an intensity model carried over from the
   reference (lesion contrast relative to the commonest ordinary tissue of
   each session, converted through the intensity map), then refined on the
   follow-up itself. Whatever the lesion has become (grown, shrunk to a
   residue, gone) is what the band finds there; a residue smaller than
   ``min_lesion_ml`` or no band at all gives an empty mask.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import SimpleITK as sitk

from khe_vol.geometry import (from_canonical, from_sitk, grid_corners_world, shrink_by_index, to_canonical,
                              to_sitk, voxel_sizes_mm, voxel_to_world, world_to_voxel)
from khe_vol.segmentation.band import fluid_beside, iterate_segmentation, threshold_band_ml
from khe_vol.segmentation.edges import refine_edges
from khe_vol.segmentation.intensity import (IntensityModel, bright_share, itk_threads, prepare_roi, robust_sd,
                                            tissue_level)
from khe_vol.segmentation.morphology import crop_affine, distance_outside_mm, erode_mm, mask_box, within_mm
from khe_vol.segmentation.params import SegmentationError, SegmentationParams

#: Flip between RAS+ and LPS+ as a 4x4 (its own inverse).
_FLIP4 = np.diag([-1.0, -1.0, 1.0, 1.0])

#: A follow-up is a *plain positive rescaling* of its reference when the map
#: ``reference = gain * follow-up + offset`` has ``gain > 0`` and ``|offset|``
#: at most this share of the reference's lesion contrast (lesion level minus
#: tissue level, reference units). Unscaled phantom follow-ups (other bias
#: field, noise and lesion size) give offsets of at most a few percent.
OFFSET_TOLERANCE = 0.1

#: Below this absolute rank correlation between the registered reference
#: and follow-up around the lesion, their intensity scales cannot be related
#: (registration failed, or another contrast altogether).
MIN_SCALE_CORRELATION = 0.3

#: Share of the fixed image's voxels the registration metric samples at random each iteration.
#: A tenth registers the throughput cohort's follow-ups as well as a quarter did (to the true
#: transform: median 1.4 mm either way at points 60-80 mm out) in half the time.
REGISTRATION_SAMPLING = 0.1

#: Percentiles whose pairs the intensity map is fitted to.
_MAP_PERCENTILES = np.linspace(5.0, 95.0, 19)


def _shrunk(array, affine, spacing_mm):
    """A SimpleITK copy of ``array`` shrunk by whole factors to voxels of about ``spacing_mm``
    (:func:`khe_vol.geometry.shrink_by_index`)."""
    factors = [max(1, int(round(spacing_mm / s))) for s in voxel_sizes_mm(affine)]
    return to_sitk(*shrink_by_index(np.asarray(array, np.float32), affine, factors))


def transform_to_ras_matrix(transform):
    """4x4 matrix of a SimpleITK transform, re-expressed in RAS+ mm.

    The SimpleITK transform maps fixed-image LPS points to moving-image LPS
    points; the result maps fixed RAS+ points to moving RAS+ points.
    """
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(transform.GetMatrix(), float).reshape(3, 3)
    center = np.asarray(transform.GetCenter(), float)
    matrix[:3, 3] = np.asarray(transform.GetTranslation(), float) + center - matrix[:3, :3] @ center
    return _FLIP4 @ matrix @ _FLIP4


def register_rigid(moving_image, moving_affine, fixed_image, fixed_affine, params=SegmentationParams(), seed=7):
    """Rigid registration of two series in physical space.

    Parameters
    ----------
    moving_image, fixed_image : (I, J, K) ndarray
        Nibabel-ordered images (any grids, orientations and voxel sizes).
    moving_affine, fixed_affine : (4, 4) ndarray
        Their voxel-to-RAS+ affines.
    params : SegmentationParams
        Uses ``registration_spacing_mm``.
    seed : int
        Seed of the metric's random sampling (results are reproducible).

    Returns
    -------
    transform : SimpleITK.Euler3DTransform
        Maps fixed LPS points to moving LPS points (SimpleITK convention),
        ready for :func:`SimpleITK.Resample` of moving data onto the fixed grid.
    info : dict
        JSON-serialisable: ``metric`` (Mattes MI, lower is better), the
        ``initialisation`` optimised from, ``metric_at_start`` of both starts,
        ``rotation_deg`` (about x, y, z, LPS), ``translation_mm`` (LPS),
        ``fixed_to_moving_ras`` (4x4 list), iterations and stop condition.
    """
    fixed = _shrunk(fixed_image, fixed_affine, params.registration_spacing_mm)
    moving = _shrunk(moving_image, moving_affine, params.registration_spacing_mm)
    # Rotate about the middle of the fixed field of view, not the scanner
    # origin, so that rotation and translation do not fight each other.
    identity = sitk.Euler3DTransform()
    identity.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    starts = {
        "identity": identity,
        "centres": sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
        ),
    }
    # Optimise from the start that already fits better, and from the other
    # only when that fails: the two rarely end apart, and each optimisation
    # was a fifth of a follow-up's job.
    at_start = {name: _mattes_metric(fixed, moving, initial) for name, initial in starts.items()}
    order = sorted(starts, key=lambda k: (not np.isfinite(at_start[k]), at_start[k]))
    results = {}
    for name in order:
        if any(v[1] is not None for v in results.values()):
            break
        initial = starts[name]
        reg = sitk.ImageRegistrationMethod()
        # One thread: the metric's sum is then in the same order on every
        # machine, so the same inputs give the same transform and mask bytes.
        reg.SetNumberOfThreads(1)
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(REGISTRATION_SAMPLING, seed)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=4.0, minStep=0.01, numberOfIterations=150, relaxationFactor=0.6,
            gradientMagnitudeTolerance=1e-6,
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([2, 1])
        reg.SetSmoothingSigmasPerLevel([2.0 * params.registration_spacing_mm, 0.5 * params.registration_spacing_mm])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetInitialTransform(sitk.Euler3DTransform(initial), inPlace=False)
        try:
            # The method's own thread count does not reach every inner filter (the
            # scales estimator, the sampler): the global default does.
            with itk_threads(1):
                out = reg.Execute(fixed, moving)
        except RuntimeError as exc:  # e.g. too little overlap from this start
            results[name] = (np.inf, None, str(exc).strip().splitlines()[-1][:200], 0)
            continue
        results[name] = (
            _mattes_metric(fixed, moving, out),
            out,
            reg.GetOptimizerStopConditionDescription(),
            int(reg.GetOptimizerIteration()),
        )
    best = min(results, key=lambda k: results[k][0])
    metric, composite, stop, iterations = results[best]
    if composite is None:
        raise SegmentationError(f"rigid registration to the reference failed: {stop}")
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(composite).GetNthTransform(0)) if isinstance(
        composite, sitk.CompositeTransform
    ) else sitk.Euler3DTransform(composite)
    # Rounded: multi-threaded metric sums differ in the last bits between runs.
    info = {
        "metric": round(metric, 6),
        "initialisation": best,
        "metric_at_start": {k: (round(v, 6) if np.isfinite(v) else None) for k, v in at_start.items()},
        "rotation_deg": [round(float(np.degrees(a)), 4) for a in (euler.GetAngleX(), euler.GetAngleY(),
                                                                  euler.GetAngleZ())],
        "translation_mm_lps": [round(float(v), 4) for v in euler.GetTranslation()],
        "center_mm_lps": [round(float(v), 4) for v in euler.GetCenter()],
        "fixed_to_moving_ras": np.round(transform_to_ras_matrix(euler), 6).tolist(),
        "iterations": iterations,
        "stop_condition": stop,
    }
    return euler, info


def _mattes_metric(fixed, moving, transform):
    """Mattes mutual information of two images under a transform (lower is better; inf when
    they do not overlap), on a regular sample, so every start and result is scored alike."""
    scorer = sitk.ImageRegistrationMethod()
    scorer.SetNumberOfThreads(1)
    scorer.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    scorer.SetMetricSamplingStrategy(scorer.REGULAR)
    scorer.SetMetricSamplingPercentage(REGISTRATION_SAMPLING)
    scorer.SetInterpolator(sitk.sitkLinear)
    scorer.SetInitialTransform(transform)
    try:
        return float(scorer.MetricEvaluate(fixed, moving))
    except RuntimeError:  # too few sample points overlap
        return float("inf")


def map_mask(mask, mask_affine, target_shape, target_affine, transform):
    """Carry a mask onto a target grid through a fixed-to-moving transform.

    Parameters
    ----------
    mask : (I, J, K) ndarray
        0/1 mask on the moving (reference) grid.
    mask_affine : (4, 4) ndarray
    target_shape : tuple of int
    target_affine : (4, 4) ndarray
        The fixed (follow-up) grid.
    transform : SimpleITK.Transform
        Fixed LPS to moving LPS, as :func:`register_rigid` returns.

    Returns
    -------
    ndarray of bool, shape ``target_shape``
        Target voxels whose centre maps inside the mask (linear
        interpolation of the 0/1 mask, kept at >= 0.5).
    """
    moving = to_sitk((np.asarray(mask) != 0).astype(np.float32), mask_affine)
    reference = to_sitk(np.zeros(tuple(int(n) for n in target_shape), np.uint8), target_affine)
    out = sitk.Resample(moving, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return from_sitk(out)[0] >= 0.5


def reference_model(ref_image, ref_affine, ref_mask, params):
    """Lesion contrast of the reference, relative to its commonest tissue.

    Returns
    -------
    dict
        ``lesion_level``, ``tissue_level`` and ``lesion_sd`` (reference image
        units, after bias correction and smoothing), ``dark``.
    """
    spacing = voxel_sizes_mm(ref_affine)
    box = mask_box(ref_mask, spacing, params.track_margin_mm + params.shell_outer_mm + 20.0)
    smoothed, _ = prepare_roi(ref_image, ref_affine, box, params)
    level, dark, _ = tissue_level(smoothed)
    values = smoothed[ref_mask[box]]
    # Leave out septa and flow voids: keep the brighter part of the lesion.
    median = float(np.median(values))
    values = values[values >= level + 0.5 * (median - level)]
    return {
        "lesion_level": float(np.median(values)),
        "tissue_level": level,
        "lesion_sd": robust_sd(values),
        "dark": dark,
        # Magnitude data (no negative values) have a true zero: no signal.
        "magnitude": bool(float(np.min(ref_image[box])) >= 0),
    }


def mask_sha256(mask):
    """SHA-256 of a mask's shape and voxels (non-zero = 1), in the array order given."""
    mask = np.asarray(mask) != 0
    return hashlib.sha256(repr(mask.shape).encode() + np.packbits(mask).tobytes()).hexdigest()


def reference_summary(ref_image, ref_affine, ref_mask, params=SegmentationParams()):
    """:func:`reference_model` of a series and its lesion, for its follow-ups to reuse.

    On the canonical array order, as :func:`track_followup` computes it, with
    ``mask_sha256`` of the lesion it describes, so that a follow-up uses it
    only for that lesion (``track_followup(..., ref_model=...)``). A baseline
    job computes it once; each follow-up then saves its bias correction.

    Returns
    -------
    dict
        :func:`reference_model` plus ``mask_sha256``.
    """
    mask = to_canonical(np.asarray(ref_mask) != 0, ref_affine)[0]
    image, affine, _ = to_canonical(ref_image, ref_affine)
    return {**reference_model(image, affine, mask, params), "mask_sha256": mask_sha256(mask)}


def carried_model(ref, smoothed, params, gain=1.0):
    """Intensity model for the follow-up, carried over from the reference.

    The lesion's contrast over the commonest ordinary tissue is kept. When
    both are magnitude data it is rescaled by the ratio of the two tissue levels
    (scanner gain and coil differ between sessions); otherwise by ``1 /
    gain``, the follow-up-to-reference gain of :func:`intensity_map`.

    Parameters
    ----------
    ref : dict
        :func:`reference_model` of the reference.
    smoothed : ndarray
        The follow-up region, bias-corrected and smoothed, on its working
        scale.
    params : SegmentationParams
    gain : float
        Reference units per working-scale unit (> 0).
    """
    level, dark, _ = tissue_level(smoothed)
    # A ratio of levels is a ratio of gains only when both zeros mean no signal.
    magnitude = ref["magnitude"] and float(np.min(smoothed)) >= 0 and ref["tissue_level"] > 0 and level > 0
    scale = level / ref["tissue_level"] if magnitude else 1.0 / gain
    contrast = (ref["lesion_level"] - ref["tissue_level"]) * scale
    return IntensityModel(
        lesion=level + contrast, surround=level, lesion_sd=ref["lesion_sd"] * scale, dark=dark, floor=level
    ), {"tissue_level": level, "scale": scale}


def theil_sen(x, y):
    """Robust line ``y = slope * x + intercept``: median of pairwise slopes, median intercept."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    i, j = np.triu_indices(x.size, 1)
    dx = x[j] - x[i]
    ok = np.abs(dx) > 1e-12 * max(float(np.ptp(x)), 1e-300)
    if not ok.any():
        raise SegmentationError("the follow-up is uniform around the lesion: no intensity scale to relate")
    slope = float(np.median((y[j] - y[i])[ok] / dx[ok]))
    return slope, float(np.median(y - slope * x))


def rank_correlation(x, y):
    """Spearman rank correlation of two samples (tied values share their mean rank).

    numpy only: importing scipy.stats would cost every series job about
    35 MB of memory for one number.
    """
    centred = []
    for v in (x, y):
        _, inverse, counts = np.unique(np.asarray(v), return_inverse=True, return_counts=True)
        mean_rank = np.cumsum(counts) - 0.5 * (counts - 1)
        r = mean_rank[inverse.ravel()]
        centred.append(r - r.mean())
    a, b = centred
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def intensity_map(image, affine, ref_image, ref_affine, transform, carried, box, params):
    """How the follow-up's stored intensities relate to the reference's.

    Fitted where the lesion cannot have changed: the tissue of the follow-up
    region ``box`` farther than ``track_margin_mm`` from the carried lesion
    (the same margin within which a grown lesion is searched for), on copies
    shrunk to about ``registration_spacing_mm``, with the reference resampled
    through the registration. The sign is that of the rank (Spearman)
    correlation of corresponding voxels; gain and offset come from a
    Theil-Sen line through the pairs of their 5th, 10th, ..., 95th
    percentiles (taken in opposite order for an inverted image). Quantiles
    are not thrown by a small misregistration, and the line not by the
    extremes (fluid, vessels, noise floor).

    Parameters
    ----------
    image : (I, J, K) ndarray
        Follow-up series as stored.
    affine : (4, 4) ndarray
    ref_image : ndarray
        Reference series as stored.
    ref_affine : (4, 4) ndarray
    transform : SimpleITK.Transform
        Follow-up (fixed) LPS to reference (moving) LPS, from :func:`register_rigid`.
    carried : ndarray of bool
        Reference lesion on the follow-up grid.
    box : tuple of slice
        The follow-up region segmented.
    params : SegmentationParams

    Returns
    -------
    dict
        ``gain`` and ``offset`` (``reference = gain * follow-up + offset``, in
        reference units; ``gain < 0`` for an inverted image),
        ``rank_correlation``, ``n_voxels`` (voxels compared) and
        ``residual`` (median absolute misfit of the percentile pairs,
        reference units).

    Raises
    ------
    SegmentationError
        Too little tissue around the lesion overlaps the reference, or the
        two barely correlate (:data:`MIN_SCALE_CORRELATION`).
    """
    roi_affine = crop_affine(affine, box)
    follow = _shrunk(image[box], roi_affine, params.registration_spacing_mm)
    # Only the part of the reference the region maps into (memory: a series
    # may be far larger than the region).
    corners = grid_corners_world([s.stop - s.start for s in box], roi_affine)
    ref_ijk = world_to_voxel(voxel_to_world(corners, transform_to_ras_matrix(transform)), ref_affine)
    lo = np.clip(np.floor(ref_ijk.min(axis=0)).astype(int) - 1, 0, ref_image.shape)
    hi = np.clip(np.ceil(ref_ijk.max(axis=0)).astype(int) + 2, 0, ref_image.shape)
    ref_box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    if min(b - a for a, b in zip(lo, hi)) < 1:
        raise SegmentationError("after registration this series' lesion region lies outside the reference series")
    reference = sitk.Resample(to_sitk(np.asarray(ref_image[ref_box], np.float32), crop_affine(ref_affine, ref_box)),
                              follow, transform, sitk.sitkLinear, float("nan"), sitk.sitkFloat32)
    near = sitk.Resample(to_sitk(carried[box].astype(np.uint8), roi_affine), follow, sitk.Transform(),
                         sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    values, small_affine = from_sitk(follow)
    ref_values = from_sitk(reference)[0]
    far = (distance_outside_mm(from_sitk(near)[0] != 0, voxel_sizes_mm(small_affine))
           > within_mm(params.track_margin_mm))
    keep = far & np.isfinite(ref_values)
    x, y = values[keep].astype(np.float64), ref_values[keep].astype(np.float64)
    if x.size < 100:
        raise SegmentationError(
            f"only {x.size} voxels of tissue around the lesion lie in both this series and the reference "
            "(at the registration's sampling); their intensity scales cannot be related"
        )
    rho = rank_correlation(x, y)
    if not abs(rho) >= MIN_SCALE_CORRELATION:
        raise SegmentationError(
            f"the tissue around the lesion barely corresponds between this series and the reference "
            f"(rank correlation {rho:.2f} after registration): check that both are T2 series of the same "
            "region and that the registration succeeded"
        )
    qx = np.percentile(x, _MAP_PERCENTILES if rho > 0 else 100.0 - _MAP_PERCENTILES)
    qy = np.percentile(y, _MAP_PERCENTILES)
    gain, offset = theil_sen(qx, qy)
    return {
        "gain": round(gain, 9),
        "offset": round(offset, 9),
        "rank_correlation": round(rho, 6),
        "n_voxels": int(x.size),
        "residual": round(float(np.median(np.abs(qy - (gain * qx + offset)))), 9),
    }


def working_scale(roi, ref, mapping):
    """The follow-up region on the scale it is segmented on, and whether that is plain.

    Parameters
    ----------
    roi : ndarray
        Follow-up region as stored.
    ref : dict
        :func:`reference_model`.
    mapping : dict
        :func:`intensity_map`.

    Returns
    -------
    working : ndarray of float32
    gain : float
        Reference units per working unit (> 0).
    info : dict
        ``mapping`` plus ``offset_share`` (``|offset|`` over the reference
        lesion contrast), ``magnitude`` and ``reference_magnitude`` (no
        negative values in the region), ``plain_rescaling`` and
        ``working_scale`` (``stored``, ``reference`` or ``stored, inverted``).

    Notes
    -----
    A *plain positive rescaling* has ``gain > 0``, ``offset_share`` <=
    :data:`OFFSET_TOLERANCE`, and negative values in neither region or in
    both. It is segmented as stored, as every follow-up was before intensity
    maps. Otherwise, when the reference is magnitude
    data, the follow-up is put on the reference's scale, clipped at its zero
    (no signal): bias correction, which divides by a field, then sees a true
    zero again. When the reference has no true zero (z-scored), the
    follow-up keeps its own scale, turned the right way up.
    """
    gain, offset = mapping["gain"], mapping["offset"]
    contrast = ref["lesion_level"] - ref["tissue_level"]
    share = abs(offset) / contrast if contrast > 0 else float("inf")
    roi = np.asarray(roi, np.float32)
    magnitude = bool(float(roi.min()) >= 0)
    # Same domain too: bias correction runs on magnitude data only, so a
    # z-scored follow-up of a magnitude reference is never "plain".
    plain = gain > 0 and share <= OFFSET_TOLERANCE and magnitude == ref["magnitude"]
    if plain:
        working, scale_name, working_gain = roi, "stored", gain
    elif ref["magnitude"]:
        working = np.maximum(np.float32(gain) * roi + np.float32(offset), np.float32(0))
        scale_name, working_gain = "reference", 1.0
    else:
        working = roi if gain > 0 else -roi
        scale_name, working_gain = ("stored" if gain > 0 else "stored, inverted"), abs(gain)
    info = {**mapping, "offset_share": round(share, 6), "offset_tolerance": OFFSET_TOLERANCE,
            "magnitude": magnitude, "reference_magnitude": bool(ref["magnitude"]),
            "plain_rescaling": bool(plain), "working_scale": scale_name}
    return working, working_gain, info


def scale_review_detail(mapping):
    """Why a follow-up's intensity scale is not a plain positive rescaling, for a coordinator.

    Parameters
    ----------
    mapping : dict
        ``info["intensity_map"]`` of :func:`track_followup`.

    Returns
    -------
    str or None
        None when it is a plain positive rescaling (no review needed).
    """
    if mapping.get("plain_rescaling", True):
        return None
    why = []
    if mapping["gain"] < 0:
        why.append("inverted (negative gain)")
    if mapping["offset_share"] > mapping["offset_tolerance"]:
        why.append(f"offset {mapping['offset_share']:.0%} of the reference lesion contrast "
                   f"(tolerance {mapping['offset_tolerance']:.0%})")
    if mapping["magnitude"] != mapping["reference_magnitude"]:
        why.append("this series has negative values and the reference none" if not mapping["magnitude"]
                   else "the reference has negative values and this series none")
    return (f"reference = {mapping['gain']:.4g} x this series {mapping['offset']:+.4g}: {', '.join(why)}; "
            f"segmented on the {mapping['working_scale']} scale")


def track_followup(image, affine, ref_image, ref_affine, ref_mask, params=SegmentationParams(), ref_model=None):
    """Segment what is left of a reference lesion in a follow-up series.

    Parameters
    ----------
    image : (I, J, K) ndarray
        Follow-up T2 series, nibabel order.
    affine : (4, 4) ndarray
        Its voxel-to-RAS+ affine, mm.
    ref_image : ndarray
        Reference (baseline) series.
    ref_affine : (4, 4) ndarray
    ref_mask : ndarray
        Reference lesion mask on the reference grid (non-zero = lesion).
    params : SegmentationParams
    ref_model : dict, optional
        :func:`reference_summary` of the reference, computed with the same
        ``params``; used when its ``mask_sha256`` is that of ``ref_mask``
        (the result is the same either way, only faster).

    Returns
    -------
    mask : ndarray of uint8, shape ``image.shape``
        The lesion in the follow-up; all zeros when it has gone.
    info : dict
        JSON-serialisable: ``registration`` (see :func:`register_rigid`),
        ``intensity_map`` (see :func:`intensity_map` and
        :func:`working_scale`; ``plain_rescaling`` false means the follow-up
        stores intensities on another scale than the reference: an offset
        beyond :data:`OFFSET_TOLERANCE`, an inverted sign, z-scoring),
        ``reference_model`` and ``model`` (intensity levels), the threshold
        history, ``status`` (``"found"`` or ``"not found"``), ``n_voxels``,
        ``volume_ml``, ``seconds`` (CPU).

    Raises
    ------
    SegmentationError
        Empty reference mask, the reference lesion falls outside the
        follow-up's field of view, or the intensity scales cannot be related
        (see :func:`intensity_map`).
    """
    started = time.process_time()
    image = np.asarray(image)
    affine = np.asarray(affine, float)
    ref_image = np.asarray(ref_image)
    ref_affine = np.asarray(ref_affine, float)
    ref_mask = np.asarray(ref_mask) != 0
    if ref_mask.shape != ref_image.shape:
        raise SegmentationError(
            f"reference mask shape {ref_mask.shape} does not match the reference image {ref_image.shape}"
        )
    if not ref_mask.any():
        raise SegmentationError("the reference mask is empty: there is no lesion to track")
    # On the canonical array orders, so the result does not depend on the order the files used.
    ref_mask = to_canonical(ref_mask, ref_affine)[0]
    ref_image, ref_affine, _ = to_canonical(ref_image, ref_affine)
    image, affine, ornt = to_canonical(image, affine)

    transform, reg_info = register_rigid(ref_image, ref_affine, image, affine, params)
    info = {"registration": reg_info}
    carried = map_mask(ref_mask, ref_affine, image.shape, affine, transform)
    info["carried_reference_voxels"] = int(carried.sum())
    if not carried.any():
        raise SegmentationError(
            "after registration the reference lesion lies outside this series' field of view; "
            "check that the follow-up covers the lesion"
        )
    if ref_model is not None and ref_model.get("mask_sha256") == mask_sha256(ref_mask):
        ref = {k: v for k, v in ref_model.items() if k != "mask_sha256"}
    else:
        ref = reference_model(ref_image, ref_affine, ref_mask, params)
    info["reference_model"] = ref

    spacing = voxel_sizes_mm(affine)
    box = mask_box(carried, spacing, params.track_margin_mm + params.shell_outer_mm + 20.0)
    mapping = intensity_map(image, affine, ref_image, ref_affine, transform, carried, box, params)
    working, gain, info["intensity_map"] = working_scale(image[box], ref, mapping)
    smoothed, roi_info = prepare_roi(working, crop_affine(affine, box), tuple(slice(0, n) for n in working.shape),
                                     params)
    info.update(roi_info)
    model, carried_info = carried_model(ref, smoothed, params, gain)
    info["carried_model"] = {**model.as_dict(params), **carried_info}

    start = erode_mm(carried[box], spacing, params.track_erosion_mm)
    if not start.any():
        start = carried[box]  # a thin reference lesion: start from all of it
    # Search only near the carried lesion: a residue lies inside it, and a
    # grown lesion is connected to it.
    region, model, history = iterate_segmentation(smoothed, model, start, spacing, params)
    region = refine_edges(smoothed, region, spacing, params)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    if region.sum() * voxel_ml < params.min_lesion_ml:
        region[...] = False
    info["threshold_band_ml"] = threshold_band_ml(smoothed, model, region, spacing, params, voxel_ml)
    info["bright_share"] = bright_share(smoothed, region, model)
    info["fluid_beside"] = fluid_beside(smoothed, model, region, spacing, params)
    mask = np.zeros(image.shape, np.uint8)
    mask[box] = region
    n = int(mask.sum())
    info.update(model.as_dict(params))
    info.update(
        threshold_history=history,
        status="found" if n else "not found",
        n_voxels=n,
        volume_ml=float(n * voxel_ml),
        seconds=round(time.process_time() - started, 3),
    )
    return from_canonical(mask, ornt), info
