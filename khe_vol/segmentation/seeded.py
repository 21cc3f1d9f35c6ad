"""Seeded segmentation: the entry point from a reader's seed (region of interest, bias,
model, band, edges, recentring)."""

from __future__ import annotations

import time

import numpy as np

from khe_vol.geometry import from_canonical, seed_voxel, to_canonical, voxel_sizes_mm
from khe_vol.segmentation.band import (enclosed_core, fluid_beside, interior_sd_contrast, iterate_segmentation,
                                       seed_in_fluid, threshold_band_ml)
from khe_vol.segmentation.edges import refine_edges
from khe_vol.segmentation.intensity import PreparedRoi, bright_share, initial_model, prepare_roi
from khe_vol.segmentation.morphology import (ball_mask, bounding_box, crop_box, fill_lesion_holes, voxels_covering,
                                             within_mm)
from khe_vol.segmentation.params import SegmentationError, SegmentationParams


def segment_from_seed(image, affine, seed_ras_mm, params=SegmentationParams()):
    """Segment the hyperintense lesion containing (or right next to) a seed point.

    The automatic path of :func:`khe_vol.segmentation.interactive.segment_clicks`
    with one include point.

    Parameters
    ----------
    image : (I, J, K) array_like
        T2 image as nibabel returns it.
    affine : (4, 4) array_like
        Voxel-to-world RAS+ affine, mm.
    seed_ras_mm : (3,) array_like
        A point in the lesion, scanner RAS+ mm.
    params : SegmentationParams

    Returns
    -------
    mask : ndarray of uint8, shape ``image.shape``
        1 = lesion.
    info : dict
        JSON-serialisable: intensity model and thresholds (image units),
        their history, bias field range, ``n_voxels``, ``volume_ml``,
        ``touches_roi_border``, ``seconds`` (CPU).

    Raises
    ------
    SegmentationError
        Seed outside the image, or no hyperintense lesion at the seed.
    """
    # On the canonical array order, so the result does not depend on the order a file used.
    image, affine, ornt = to_canonical(image, affine)
    mask, info, _ = seeded_roi(image, affine, seed_ras_mm, params)
    return from_canonical(mask, ornt), info


def seeded_roi(image, affine, seed_ras_mm, params=SegmentationParams(), prepare=prepare_roi, volume_band=True):
    """:func:`segment_from_seed`, also returning the prepared region of interest.

    Parameters
    ----------
    image, affine, seed_ras_mm, params
        As :func:`segment_from_seed`.
    prepare : callable
        :func:`prepare_roi` or a caller's memo of it (a reader's session
        prepares the whole-image box before the first click).
    volume_band : bool
        Also compute ``info["threshold_band_ml"]`` (two more segmentations;
        the reader app's clicks do without, None then).

    Returns
    -------
    mask, info
        As :func:`segment_from_seed`.
    roi : PreparedRoi
        Its box, bias-corrected smoothed intensities and intensity model
        (reused by reader clicks, :mod:`khe_vol.segmentation.interactive`).
    """
    started = time.process_time()
    image = np.asarray(image)
    affine = np.asarray(affine, dtype=float)
    if image.ndim != 3:
        raise SegmentationError(f"expected a 3D image, got an array of shape {image.shape}")
    seed_ras_mm = np.asarray(seed_ras_mm, dtype=float).reshape(3)
    ijk = seed_voxel(seed_ras_mm, affine, image.shape)
    if ijk is None:
        raise SegmentationError(
            f"seed ({seed_ras_mm[0]:.1f}, {seed_ras_mm[1]:.1f}, {seed_ras_mm[2]:.1f}) RAS+ mm lies "
            "outside the image"
        )
    spacing = voxel_sizes_mm(affine)
    # N4's fit and the tissue level depend on where the region of interest
    # cuts the image, and must not depend on where in the lesion the reader
    # clicked: the box spans the image along axes not much longer than the
    # box, and is re-centred on the lesion found until it stays put.
    box = roi_box(ijk, image.shape, spacing, params)
    result = _segment_in_box(image, affine, box, ijk, seed_ras_mm, spacing, params, prepare)
    recentred, note = 0, None
    while recentred < params.recentre_passes:
        moved = roi_box(lesion_box_centre(result[1], box), image.shape, spacing, params)
        if moved == box or not _contains(moved, ijk):
            break
        try:
            result = _segment_in_box(image, affine, moved, ijk, seed_ras_mm, spacing, params, prepare)
        except SegmentationError as exc:  # keep the lesion found in the seed's box
            note = f"re-centred region failed, the previous one kept: {exc}"
            break
        box, recentred = moved, recentred + 1
    smoothed, region, model, history, info = result
    info["roi_recentred"] = recentred
    if note:
        info["roi_recentre_note"] = note
    seed_roi = tuple(int(i - s.start) for i, s in zip(ijk, box))
    info["seed_level"] = float(smoothed[seed_roi])  # bias-corrected, smoothed intensity at the seed
    core = enclosed_core(region, seed_roi, spacing, params)
    if core.any():
        region = fill_lesion_holes(region | core, spacing, params)
    info["enclosed_core_voxels"] = int(core.sum())
    info["bright_share"] = bright_share(smoothed, region, model)
    info["fluid_beside"] = fluid_beside(smoothed, model, region, spacing, params)
    # Whether the seed lies on fluid (khe_vol.series.seed_fluid_problem): on tissue a lesion
    # model calls fluid, or on a structure as flat as fluid that the model was fitted to.
    info["seed_in_fluid"] = seed_in_fluid(smoothed, region, model, seed_roi, spacing, params)
    info["interior_sd_contrast"] = interior_sd_contrast(smoothed, region, model)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    info["threshold_band_ml"] = (threshold_band_ml(smoothed, model, region, spacing, params, voxel_ml, core)
                                 if volume_band else None)
    mask = np.zeros(image.shape, np.uint8)
    mask[box] = region
    info.update(model.as_dict(params))
    info["threshold_history"] = history
    info.update(_summary(mask, affine, region, box, image.shape))
    info["seconds"] = round(time.process_time() - started, 3)
    return mask, info, PreparedRoi(box=box, smoothed=smoothed, model=model, spacing_mm=spacing)


def roi_box(center_ijk, shape, spacing_mm, params):
    """Region of interest around a voxel: :func:`crop_box` of ``max_radius_mm``,
    spanning the whole image along axes at most ``whole_axis_mm`` long.

    Returns
    -------
    tuple of slice
    """
    box = crop_box(center_ijk, shape, spacing_mm, params.max_radius_mm)
    return tuple(slice(0, int(n)) if n * s <= within_mm(params.whole_axis_mm) else b
                 for b, n, s in zip(box, shape[:3], spacing_mm))


def _contains(box, ijk):
    return all(sl.start <= i < sl.stop for sl, i in zip(box, ijk))


def lesion_box_centre(region, box):
    """Voxel (full-image indices) at the centre of a region's bounding box.

    Parameters
    ----------
    region : ndarray of bool
        A lesion on the grid of ``image[box]``.
    box : tuple of slice
        Where ``region`` lies in the full image.

    Returns
    -------
    tuple of int
    """
    first, last = bounding_box(region)
    mid = (first + last) // 2
    return tuple(int(m + sl.start) for m, sl in zip(mid, box))


def _segment_in_box(image, affine, box, ijk, seed_ras_mm, spacing, params, prepare=prepare_roi):
    """Seeded segmentation within one region of interest (steps 2-5 of the module notes).

    Returns
    -------
    smoothed : ndarray of float32
        The prepared region.
    region : ndarray of bool
        The lesion, edges refined, on ``smoothed``'s grid.
    model : IntensityModel
    history : list of dict
    info : dict
    """
    smoothed, info = prepare(image, affine, box, params)
    info = dict(info)  # a memo's copy stays as it was
    seed_roi = tuple(int(i - s.start) for i, s in zip(ijk, box))
    near = ball_mask(smoothed.shape, seed_roi, spacing, params.seed_search_radius_mm)
    model, tissue_sd = initial_model(smoothed, smoothed[near])
    info["initial_model"] = {**model.as_dict(params), "tissue_sd": tissue_sd}
    if model.contrast < params.min_contrast * max(tissue_sd, 1e-6 * abs(model.lesion)):
        raise SegmentationError(
            f"no hyperintense tissue within {params.seed_search_radius_mm:g} mm of the seed "
            f"({seed_ras_mm[0]:.1f}, {seed_ras_mm[1]:.1f}, {seed_ras_mm[2]:.1f}) RAS+ mm: the brightest "
            f"tissue there ({model.lesion:.4g}) is barely above the surrounding tissue ({model.surround:.4g}); "
            "place the seed inside the lesion"
        )
    region, model, history = _search_near_seed(smoothed, model, seed_roi, spacing, params)
    if not region.any():
        raise SegmentationError(
            f"no lesion found within {params.seed_search_radius_mm:g} mm of the seed "
            f"({seed_ras_mm[0]:.1f}, {seed_ras_mm[1]:.1f}, {seed_ras_mm[2]:.1f}) RAS+ mm; "
            "place the seed inside the lesion"
        )
    return smoothed, refine_edges(smoothed, region, spacing, params), model, history, info


def _search_near_seed(smoothed, model, seed_roi, spacing, params):
    """:func:`iterate_segmentation` from the seed, first within ``max_radius_mm`` of it.

    The intensity model comes from the whole region of interest; only the
    search is confined, which saves time on a region larger than that box.
    The steps look at most ``margin`` mm beyond the lesion (the statistics of
    a fluid plateau reaching from the lesion to the cut aside), so a lesion
    farther than that from where the box cuts the region is the one the
    whole region gives; otherwise the whole region is searched.
    """
    search = crop_box(seed_roi, smoothed.shape, spacing, params.max_radius_mm)
    margin = voxels_covering(params.shell_outer_mm + params.opening_radius_mm + 10.0, spacing)
    if any(sl.start > 0 or sl.stop < n for sl, n in zip(search, smoothed.shape)):
        start = tuple(i - sl.start for i, sl in zip(seed_roi, search))
        sub, sub_model, history = iterate_segmentation(
            smoothed[search], model, start, spacing, params, params.seed_search_radius_mm
        )
        if sub.any():
            lo, hi = bounding_box(sub)
            clear = all((sl.start == 0 or a >= m) and (sl.stop == n or b < sl.stop - sl.start - m)
                        for sl, n, a, b, m in zip(search, smoothed.shape, lo, hi, margin))
            if clear:
                region = np.zeros(smoothed.shape, bool)
                region[search] = sub
                return region, sub_model, history
    return iterate_segmentation(smoothed, model, seed_roi, spacing, params, params.seed_search_radius_mm)


def _summary(mask, affine, region, box, shape):
    """Voxel count, volume and whether the lesion was cut by the search box."""
    n = int(np.count_nonzero(mask))
    touches = False
    for axis, s in enumerate(box):
        if (s.start > 0 and np.take(region, 0, axis=axis).any()) or (
            s.stop < shape[axis] and np.take(region, -1, axis=axis).any()
        ):
            touches = True
    return {
        "n_voxels": n,
        "volume_ml": float(n * abs(np.linalg.det(np.asarray(affine)[:3, :3])) / 1000.0),
        "touches_roi_border": touches,
    }
