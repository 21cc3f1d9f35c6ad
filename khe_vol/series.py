"""One series, start to finish: validate, segment (or take the reader's mask), measure.

This is the body of the workflow's per-series job. It never raises for a
bad series: every outcome is a *record* (a JSON-serialisable dict) with
``status`` ``ok`` or ``error`` and a message naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from khe_vol import __version__
from khe_vol.geometry import (
    grid_corners_world,
    grids_overlap,
    resample_mask_to_grid,
    seed_voxel,
    voxel_sizes_mm,
    voxel_volume_mm3,
)
from khe_vol.measure import lesion_size
from khe_vol.nifti import SeriesError, load_series
from khe_vol.record import SeriesRecord
from khe_vol.review import BRIGHT_SHARE, FLUID_NEAR_LESION_CONTRAST, FLUID_NEAR_LESION_SHARE, SEED_FLUID_FLAT_SD, flag
from khe_vol.segmentation.uncertainty import volume_band_ml

METHOD_AUTO = "auto"
METHOD_READER = "reader_mask"

#: ``seed_source`` of a record: where its seed came from (None: no seed).
SEED_FROM_FILE = "seeds_file"
SEED_FROM_READER = "reader"


def segmentation_params(overrides=None):
    """``SegmentationParams`` with config overrides applied (unknown names are errors)."""
    from khe_vol.segmentation.params import SegmentationParams

    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(SegmentationParams)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown segmentation parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return SegmentationParams(**overrides)


def base_record(participant_id, session_id, month) -> SeriesRecord:
    """A record with every field present, as an error until proven otherwise."""
    return {
        "participant_id": participant_id,
        "session_id": session_id,
        "month": month,
        "status": "error",
        "message": None,
        "method": None,
        "n_voxels": None,
        "voxel_volume_mm3": None,
        "volume_ml": None,
        "volume_low_ml": None,
        "volume_high_ml": None,
        "mesh_volume_ml": None,
        "max_diameter_cm": None,
        "source_file": None,
        "source_sha256": None,
        "affine_source": None,
        "shape": None,
        "affine": None,
        "seed_ras_mm": None,
        "seed_source": None,
        "needs_seed": False,
        "reference_needs_seed": False,
        "reader_mask_file": None,
        "reader_mask_sha256": None,
        "reference_session_id": None,
        "parameters": None,
        "details": None,
        "review": [],
        "khe_vol_version": __version__,
    }


def _fov_text(shape, affine):
    corners = grid_corners_world(shape, affine)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    return ", ".join(f"{ax} {a:.1f} to {b:.1f}" for ax, a, b in zip("xyz", lo, hi))


def load_mask_file(mask_path):
    """A reader's mask file as a :class:`~khe_vol.nifti.LoadedImage` of 0/1, possibly empty.

    Every format (NIfTI label maps from ITK-SNAP, 3D Slicer segmentations,
    NRRD label maps) goes through :func:`khe_vol.reader_masks.read_reader_mask`:
    the same header checks and the same label-value checks; its affine is RAS+.
    """
    from khe_vol.reader_masks import read_reader_mask

    try:
        return read_reader_mask(mask_path)
    except SeriesError:
        raise
    except ValueError as exc:
        raise SeriesError(str(exc)) from exc


def seed_tissue_problem(seed_level, lower_threshold, upper_threshold, seed_in_mask):
    """Why a seed may not lie in bright lesion tissue, or None when it does.

    A pure check of what :func:`khe_vol.segmentation.seeded.segment_from_seed` settled
    on: lesion tissue is at least ``lower_threshold`` (half-way between the
    surrounding tissue and the lesion level). A seed darker than that lies on
    fat, muscle, oedema or a septum; a seed the segmented lesion does not
    contain lies on a vessel, fluid or tissue beside the lesion (the
    segmentation took the nearest lesion-like tissue instead). Either way the
    segmented structure may not be the one the reader meant.

    Parameters
    ----------
    seed_level : float
        Bias-corrected, smoothed intensity at the seed voxel (image units).
    lower_threshold, upper_threshold : float
        The segmentation's final lesion band (image units); above the upper
        one, tissue may be fluid.
    seed_in_mask : bool
        Whether the seed voxel is in the segmented lesion.

    Returns
    -------
    str or None
    """
    band = f"lesion band {lower_threshold:.4g} to {upper_threshold:.4g}"
    if seed_level < lower_threshold:
        return (f"seed intensity {seed_level:.4g} (bias-corrected) is below the {band} the segmentation settled "
                "on: the seed lies on darker tissue (fat, muscle, oedema or a septum)")
    if not seed_in_mask:
        return (f"the seed voxel (intensity {seed_level:.4g}; {band}) is not in the segmented lesion: the seed "
                "may lie on a vessel, fluid or tissue beside the lesion, and the lesion nearest it was segmented")
    return None


def seed_fluid_problem(seed_in_fluid, interior_sd_contrast, flat_sd=SEED_FLUID_FLAT_SD):
    """Why a seed may lie on fluid rather than on the lesion, or None.

    A pure check of what the seeded segmentation found. A seed on a fluid
    collection away from the lesion segments the collection: the intensity
    model is fitted to it, so the fluid test (a flat plateau above the
    lesion band) cannot see it, and only the structure's flatness tells: its
    interior varies by at most ``flat_sd`` of its contrast
    (:data:`khe_vol.review.SEED_FLUID_FLAT_SD`; lesions 0.09-0.15, fluid
    about 0.01). A seed on fluid beside the lesion lies on tissue a lesion
    model calls fluid (:func:`khe_vol.segmentation.band.seed_in_fluid`).

    Parameters
    ----------
    seed_in_fluid : bool
        :func:`khe_vol.segmentation.band.seed_in_fluid`.
    interior_sd_contrast : float or None
        :func:`khe_vol.segmentation.band.interior_sd_contrast` of the segmented lesion.
    flat_sd : float
        Flatness limit, in contrasts.

    Returns
    -------
    str or None
    """
    if interior_sd_contrast is not None and interior_sd_contrast <= flat_sd:
        return (f"the segmented structure is as flat as fluid (interior SD {interior_sd_contrast:.3f} of its contrast, "
                f"at most {flat_sd:g}; lesion tissue has texture): the seed may lie on a fluid collection, "
                "not on the lesion")
    if seed_in_fluid:
        return ("the seed voxel lies on tissue a lesion model calls fluid (a flat plateau above the lesion band, under "
                "the final model or that of the segmented structure's darker part): the seed is on fluid, and what "
                "was segmented may be the fluid with a part of the lesion joined to it, or the lesion beside it")
    return None


def flag_geometry(record, image, what="series"):
    """Flag ``geometry_disagrees`` when an image's sform and qform disagree (one entry, details joined)."""
    found = image.geometry_disagreement
    if not found:
        return
    detail = (f"{what} {image.path}: sform and qform differ by up to {found['distance_mm']:.1f} mm over the "
              f"field of view and {found['rotation_deg']:.1f} degrees; the {found['used']} was used (nibabel's "
              "rule); software reading the qform shows the image elsewhere")
    for item in record.get("review") or []:
        if item["reason"] == "geometry_disagrees":
            item["detail"] += "; " + detail
            return
    flag(record, "geometry_disagrees", detail)


def too_thin_for_bias_fit(shape, affine, params):
    """The first array axis along which a grid is too thin for the N4 bias-field fit, or None.

    N4 is fitted on a copy shrunk by whole factors per axis
    (:func:`khe_vol.segmentation.intensity.n4_shrink_factors`) and needs at least two
    voxels along every axis there; with fewer, ITK fails with a raw error.

    Parameters
    ----------
    shape : sequence of int
    affine : (4, 4) array_like
    params : khe_vol.segmentation.params.SegmentationParams

    Returns
    -------
    tuple or None
        ``(axis, extent_mm, needed_mm)``.
    """
    if not params.bias_correction:
        return None
    from khe_vol.segmentation.intensity import n4_shrink_factors

    sizes = voxel_sizes_mm(affine)
    for axis, (n, size, shrink) in enumerate(zip(shape, sizes, n4_shrink_factors(shape, sizes, params))):
        if n // shrink < 2:
            return axis, float(n * size), float(2 * shrink * size)
    return None


def reader_mask_on_grid(mask_path, series):
    """A reader's mask brought onto the series grid by physical position.

    Raises
    ------
    SeriesError
        If the mask is unreadable, or its field of view or its lesion lies
        outside the series.
    """
    mask = load_mask_file(mask_path)
    if not grids_overlap(series.data.shape, series.affine, mask.data.shape, mask.affine):
        raise SeriesError(
            f"{mask.path}: reader mask does not overlap its series {series.path} "
            f"(mask covers {_fov_text(mask.data.shape, mask.affine)}; series covers "
            f"{_fov_text(series.data.shape, series.affine)} RAS+ mm)"
        )
    on_grid = resample_mask_to_grid(mask.data, mask.affine, series.data.shape, series.affine)
    if np.count_nonzero(mask.data) and not np.count_nonzero(on_grid):
        raise SeriesError(
            f"{mask.path}: the lesion drawn in this mask lies outside the field of view of {series.path}"
        )
    return on_grid, mask


def _flag_fluid_near_lesion(record, info, voxel_ml):
    """Flag an automatic mask beside which tissue barely brighter than the lesion was left out as fluid."""
    near = [item for item in info.get("fluid_beside") or []
            if item["level_above_lesion"] < FLUID_NEAR_LESION_CONTRAST]
    n_voxels = sum(item["n_voxels"] for item in near)
    if near and n_voxels >= FLUID_NEAR_LESION_SHARE * max(info.get("n_voxels") or 0, 1):
        ml = n_voxels * voxel_ml
        level = min(item["level_above_lesion"] for item in near)
        flag(record, "fluid_near_lesion_level",
             f"{ml:.1f} mL beside the lesion left out as fluid, {level:.2f} lesion contrasts above its level")


def _flag_bright_inclusion(record, info):
    """Flag an automatic mask that took in much brighter tissue than the lesion (fluid, a vessel)."""
    share = info.get("bright_share", 0.0)
    if share > BRIGHT_SHARE:
        flag(record, "bright_inclusion", f"{share:.0%} of the mask is brighter than the lesion level by more than "
             "half the lesion contrast")


def measure_series(
    participant_id,
    session_id,
    month,
    image_path,
    problem=None,
    seed_ras_mm=None,
    reader_mask_path=None,
    reference=None,
    params_overrides=None,
    needs_seed=False,
):
    """Validate, segment and measure one series.

    Parameters
    ----------
    participant_id, session_id : str
        ``sub-...`` and ``ses-...``.
    month : int or None
        Month of the session.
    image_path : path-like or None
        The T2w series.
    problem : str, optional
        A problem found by discovery; the record becomes an error with it.
    seed_ras_mm : (3,) sequence of float, optional
        Reader's seed in scanner RAS+ mm for this session.
    reader_mask_path : path-like, optional
        A reader mask that replaces automatic segmentation.
    reference : dict, optional
        For tracking from another session: ``record`` (that session's
        record), ``mask`` (its mask array on its grid, or None).
    params_overrides : dict, optional
        Segmentation parameter overrides from the config.
    needs_seed : bool
        A baseline with no seed, no reader mask and nothing to track from
        (:data:`khe_vol.plan.SOURCE_NEEDS_SEED`): the image is validated and
        the record says it waits for a seed (``needs_seed``), with no volume.

    Returns
    -------
    record : dict
    mask : ndarray of uint8 or None
        The lesion mask on the series grid (``None`` on error).
    affine : ndarray or None
    """
    record = base_record(participant_id, session_id, month)
    if image_path is not None:
        record["source_file"] = str(image_path)
    if problem:
        record["message"] = problem
        return record, None, None
    try:
        series = load_series(image_path)
        record.update(
            source_sha256=series.sha256,
            affine_source=series.affine_source,
            shape=list(series.data.shape),
            affine=series.affine.tolist(),
        )
        flag_geometry(record, series)
        if needs_seed:
            record["needs_seed"] = True
            raise SeriesError(
                f"{series.path}: no seed and no reader mask for {participant_id}: waiting for a seed. With readers "
                "set, each reader seeds this baseline in the reader app (click inside the lesion) and its follow-ups "
                "are tracked from that reader's own baseline; otherwise add a seed (participant_id, x, y, z in RAS+ "
                "mm) to the seeds table or a reader mask"
            )
        mask, details = _lesion_mask(series, seed_ras_mm, reader_mask_path, reference, params_overrides, record)
    except (SeriesError, ValueError) as exc:
        record["message"] = str(exc)
        return record, None, None
    except Exception as exc:  # a bug or a library failure must not stop the cohort
        logging.getLogger(__name__).exception("unexpected failure on %s", image_path)
        record["message"] = f"{image_path}: unexpected failure ({type(exc).__name__}: {exc}); see the job log"
        return record, None, None
    record.update(lesion_size(mask, series.affine))
    # Threshold doubt comes from the segmentation (re-run with its threshold
    # moved); a reader's mask has only the boundary doubt.
    record["volume_low_ml"], record["volume_high_ml"] = volume_band_ml(
        mask, series.affine, details.get("threshold_band_ml", ())
    )
    record["status"] = "ok"
    # Timings vary run to run; they live in Snakemake's benchmark files, not
    # in records, so reruns give the same bytes.
    record["details"] = {k: v for k, v in details.items() if "seconds" not in k}
    return record, mask, series.affine


def _apply_engine(series, mask, info, params, record):
    """The mask of the configured engine (``segmentation.engine``) from the classical one.

    With ``learned`` or ``hybrid`` the learned mask is the result; both
    volumes go to ``info["engines"]``, the classical one widens the volume
    band, and a disagreement beyond ``engines_disagree_fraction`` is flagged.
    """
    if params.engine == "classical" or not mask.any():
        return mask
    from khe_vol.segmentation.learned import engine_mask

    learned, learned_info = engine_mask(series.data, series.affine, mask, params)
    voxel_ml = voxel_volume_mm3(series.affine) / 1000.0
    classical_ml = float(np.count_nonzero(mask)) * voxel_ml
    learned_ml = learned_info["volume_ml"]
    info["engines"] = {"classical_ml": classical_ml, **learned_info}
    # Two independent methods' volumes: the band holds both.
    info["threshold_band_ml"] = [*(info.get("threshold_band_ml") or ()), classical_ml]
    share = abs(learned_ml - classical_ml) / classical_ml
    if share > params.engines_disagree_fraction:
        flag(record, "engines_disagree",
             f"the {params.engine} engine measures {learned_ml:.2f} mL, the classical engine {classical_ml:.2f} mL "
             f"({share:.0%} apart, more than {params.engines_disagree_fraction:.0%})")
    return learned


def _lesion_mask(series, seed_ras_mm, reader_mask_path, reference, params_overrides, record):
    # Which source applies is decided once, by khe_vol.plan.series_plan.
    if sum(x is not None for x in (reader_mask_path, seed_ras_mm, reference)) > 1:
        raise ValueError(
            f"{series.path}: give one of a reader mask, a seed or a reference (see khe_vol.plan.series_plan)"
        )
    if reader_mask_path is not None:
        mask, mask_image = reader_mask_on_grid(reader_mask_path, series)
        record.update(method=METHOD_READER, reader_mask_file=str(reader_mask_path),
                      reader_mask_sha256=mask_image.sha256)
        flag_geometry(record, mask_image, "reader mask")
        if record["month"] == 0 and not mask.any():
            # Every follow-up is compared with the baseline: 0 mL there leaves
            # no category, and a KHE participant enrols with a lesion, so an
            # empty baseline mask is a wrong file, not a measurement.
            raise SeriesError(
                f"{mask_image.path}: reader mask is empty (no lesion voxels) at the baseline, so no "
                "follow-up can be compared with it; check this is the lesion mask (not an empty export "
                "or another label), or remove it to segment the baseline from the seed"
            )
        return mask, {"mask_affine_source": mask_image.affine_source}

    if seed_ras_mm is None and reference is None:
        raise SeriesError(
            f"{series.path}: no seed and no reader mask for {record['participant_id']}; "
            "add a seed (participant_id, x, y, z in RAS+ mm) to the seeds table or a reader mask"
        )

    from khe_vol.review import flag
    from khe_vol.segmentation.params import SegmentationError
    from khe_vol.segmentation.interactive import INCLUDE, Click, segment_clicks
    from khe_vol.segmentation.track import reference_summary, scale_review_detail, track_followup

    params = segmentation_params(params_overrides)
    record["parameters"] = dataclasses.asdict(params)
    record["method"] = METHOD_AUTO
    thin = too_thin_for_bias_fit(series.data.shape, series.affine, params)
    if thin is not None:
        axis, extent_mm, needed_mm = thin
        raise SeriesError(
            f"{series.path}: the image covers only {extent_mm:.1f} mm along array axis {axis} "
            f"({series.data.shape[axis]} slices); the automatic segmentation needs at least {needed_mm:.0f} mm "
            "there (its bias-field fit); give this series a reader mask"
        )
    try:
        if seed_ras_mm is not None:
            seed = [float(v) for v in seed_ras_mm]
            record["seed_ras_mm"] = seed
            record["seed_source"] = SEED_FROM_FILE
            if seed_voxel(seed, series.affine, series.data.shape) is None:
                raise SeriesError(
                    f"{series.path}: seed ({seed[0]:.1f}, {seed[1]:.1f}, {seed[2]:.1f}) RAS+ mm lies outside "
                    f"the image (it covers {_fov_text(series.data.shape, series.affine)}); check the seeds "
                    "table uses scanner RAS+ mm (LPS values need x and y negated)"
                )
            # The reader's click engine with one include click: the seed.
            mask, info = segment_clicks(series.data, series.affine, [Click(INCLUDE, seed)], params=params)
            info = info["seeded"]
            problem = seed_tissue_problem(info["seed_level"], info["lower_threshold"], info["upper_threshold"],
                                          bool(mask[seed_voxel(seed, series.affine, series.data.shape)]))
            if problem:
                flag(record, "seed_not_in_lesion_tissue", problem)
            on_fluid = seed_fluid_problem(info.get("seed_in_fluid", False), info.get("interior_sd_contrast"))
            if on_fluid:
                flag(record, "seed_on_fluid", on_fluid)
            _flag_bright_inclusion(record, info)
            _flag_fluid_near_lesion(record, info, voxel_volume_mm3(series.affine) / 1000.0)
            mask = _apply_engine(series, mask, info, params, record)
            if mask.any():  # what every follow-up tracked from this lesion needs of it, computed once
                info["reference_model"] = reference_summary(series.data, series.affine, mask, params)
            return mask, info
        ref_record = reference["record"]
        record["reference_session_id"] = ref_record["session_id"]
        if ref_record.get("needs_seed"):
            record["reference_needs_seed"] = True
            raise SeriesError(
                f"{series.path}: not tracked yet: its reference session {ref_record['session_id']} has no seed; "
                "it is tracked from each reader's seeded baseline once that reader seeds it in the reader app "
                "(or add a seed or reader mask for that session)"
            )
        if ref_record["status"] != "ok":
            raise SeriesError(
                f"{series.path}: cannot track the lesion because its reference session "
                f"{ref_record['session_id']} failed: {ref_record['message']}"
            )
        for item in ref_record.get("review") or []:
            if item["reason"] == "seed_on_fluid":  # tracking follows the reference's structure, fluid or not
                flag(record, "seed_on_fluid", f"tracked from {ref_record['session_id']}, whose seed may lie on "
                     f"fluid: {item['detail']}")
        ref_series = load_series(ref_record["source_file"])
        ref_mask = reference["mask"]
        if ref_mask is None or not np.count_nonzero(ref_mask):
            # Tracking follows the reference lesion: from nothing it would
            # find nothing, a silent 0 mL whatever this series holds.
            raise SeriesError(
                f"{series.path}: cannot track the lesion because its reference session "
                f"{ref_record['session_id']} has an empty lesion mask (0 mL): there is no lesion to follow; "
                "check that session's mask or seed, or give this series a reader mask"
            )
        cached = (ref_record.get("details") or {}).get("reference_model")
        if ref_record.get("parameters") != record["parameters"]:
            cached = None  # computed under other parameters
        mask, info = track_followup(series.data, series.affine, ref_series.data, ref_series.affine, ref_mask, params,
                                    ref_model=cached)
        scale_detail = scale_review_detail(info["intensity_map"])
        if scale_detail:  # another gain-and-offset, sign or z-scoring than the reference
            flag(record, "intensity_scale_differs", scale_detail)
        _flag_bright_inclusion(record, info)
        _flag_fluid_near_lesion(record, info, voxel_volume_mm3(series.affine) / 1000.0)
        return _apply_engine(series, mask, info, params, record), info
    except SegmentationError as exc:
        raise SeriesError(f"{series.path}: automatic segmentation failed: {exc}") from exc

