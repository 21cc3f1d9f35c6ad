"""Find a lesion again in a follow-up series, starting from the reference (baseline) lesion.

1. **Register** the follow-up to the reference rigidly in physical space
   (:func:`register_rigid`: SimpleITK Euler 3D transform, Mattes mutual
   information, two resolutions on copies shrunk to about
   ``registration_spacing_mm``), started from both the identity (both series
   are in scanner space) and from aligned field-of-view centres, keeping the
   better metric.
2. **Carry** the reference lesion mask onto the follow-up grid through that
   transform (linear interpolation of the 0/1 mask, kept at >= 0.5).
3. **Re-segment** on the follow-up with the band segmentation of
   :mod:`khe_vol.segment`, started from the carried lesion eroded by
   ``track_erosion_mm`` and with an intensity model carried over from the
   reference (lesion contrast relative to the commonest ordinary tissue),
   then refined on the follow-up itself. Whatever the lesion has become
   (grown, shrunk to a residue, gone) is what the band finds there; a
   residue smaller than ``min_lesion_ml`` or no band at all gives an empty
   mask.
"""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk

from khe_vol.geometry import from_sitk, to_sitk, voxel_sizes_mm
from khe_vol.segment import (
    IntensityModel,
    SegmentationError,
    SegmentationParams,
    erode_mm,
    iterate_segmentation,
    mask_box,
    prepare_roi,
    refine_edges,
    robust_sd,
    threshold_band_ml,
    tissue_level,
)

#: Flip between RAS+ and LPS+ as a 4x4 (its own inverse).
_FLIP4 = np.diag([-1.0, -1.0, 1.0, 1.0])


def _shrunk(image, spacing_mm):
    """``image`` shrunk by whole factors to voxels of about ``spacing_mm``."""
    factors = [max(1, int(round(spacing_mm / s))) for s in image.GetSpacing()]
    return sitk.Shrink(image, factors) if max(factors) > 1 else image


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
        ``initialisation`` kept, the metrics of every start tried,
        ``rotation_deg`` (about x, y, z, LPS), ``translation_mm`` (LPS),
        ``fixed_to_moving_ras`` (4x4 list), iterations and stop condition.
    """
    fixed = _shrunk(to_sitk(np.asarray(fixed_image, np.float32), fixed_affine), params.registration_spacing_mm)
    moving = _shrunk(to_sitk(np.asarray(moving_image, np.float32), moving_affine), params.registration_spacing_mm)
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
    results = {}
    for name, initial in starts.items():
        reg = sitk.ImageRegistrationMethod()
        # One thread: the metric's sum is then in the same order on every
        # machine, so the same inputs give the same transform and mask bytes.
        reg.SetNumberOfThreads(1)
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.25, seed)
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
            out = reg.Execute(fixed, moving)
        except RuntimeError as exc:  # e.g. too little overlap from this start
            results[name] = (np.inf, None, str(exc).strip().splitlines()[-1][:200], 0)
            continue
        # Score every start the same way: the metric at the final transform.
        scorer = sitk.ImageRegistrationMethod()
        scorer.SetNumberOfThreads(1)
        scorer.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        scorer.SetMetricSamplingStrategy(scorer.REGULAR)
        scorer.SetMetricSamplingPercentage(0.25)
        scorer.SetInterpolator(sitk.sitkLinear)
        scorer.SetInitialTransform(out)
        results[name] = (
            float(scorer.MetricEvaluate(fixed, moving)),
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
        "metric_by_initialisation": {k: (round(v[0], 6) if np.isfinite(v[0]) else None) for k, v in results.items()},
        "rotation_deg": [round(float(np.degrees(a)), 4) for a in (euler.GetAngleX(), euler.GetAngleY(),
                                                                  euler.GetAngleZ())],
        "translation_mm_lps": [round(float(v), 4) for v in euler.GetTranslation()],
        "center_mm_lps": [round(float(v), 4) for v in euler.GetCenter()],
        "fixed_to_moving_ras": np.round(transform_to_ras_matrix(euler), 6).tolist(),
        "iterations": iterations,
        "stop_condition": stop,
    }
    return euler, info


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
    }


def carried_model(ref, smoothed, params):
    """Intensity model for the follow-up, carried over from the reference.

    The lesion's contrast over the commonest ordinary tissue is kept; on
    magnitude data it is rescaled by the ratio of the two tissue levels
    (scanner gain and coil differ between sessions).
    """
    level, dark, _ = tissue_level(smoothed)
    magnitude = float(np.min(smoothed)) >= 0 and ref["tissue_level"] > 0 and level > 0
    scale = level / ref["tissue_level"] if magnitude else 1.0
    contrast = (ref["lesion_level"] - ref["tissue_level"]) * scale
    return IntensityModel(
        lesion=level + contrast, surround=level, lesion_sd=ref["lesion_sd"] * scale, dark=dark, floor=level
    ), {"tissue_level": level, "scale": scale}


def track_followup(image, affine, ref_image, ref_affine, ref_mask, params=SegmentationParams()):
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

    Returns
    -------
    mask : ndarray of uint8, shape ``image.shape``
        The lesion in the follow-up; all zeros when it has gone.
    info : dict
        JSON-serialisable: ``registration`` (see :func:`register_rigid`),
        ``reference_model`` and ``model`` (intensity levels), the threshold
        history, ``status`` (``"found"`` or ``"not found"``), ``n_voxels``,
        ``volume_ml``, ``seconds`` (CPU).

    Raises
    ------
    SegmentationError
        Empty reference mask, or the reference lesion falls outside the
        follow-up's field of view.
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

    transform, reg_info = register_rigid(ref_image, ref_affine, image, affine, params)
    info = {"registration": reg_info}
    carried = map_mask(ref_mask, ref_affine, image.shape, affine, transform)
    info["carried_reference_voxels"] = int(carried.sum())
    if not carried.any():
        raise SegmentationError(
            "after registration the reference lesion lies outside this series' field of view; "
            "check that the follow-up covers the lesion"
        )
    ref = reference_model(ref_image, ref_affine, ref_mask, params)
    info["reference_model"] = ref

    spacing = voxel_sizes_mm(affine)
    box = mask_box(carried, spacing, params.track_margin_mm + params.shell_outer_mm + 20.0)
    smoothed, roi_info = prepare_roi(image, affine, box, params)
    info.update(roi_info)
    model, carried_info = carried_model(ref, smoothed, params)
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
    return mask, info
