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
)
from khe_vol.measure import lesion_size
from khe_vol.nifti import SeriesError, load_series
from khe_vol.uncertainty import volume_band_ml

METHOD_AUTO = "auto"
METHOD_READER = "reader_mask"


def segmentation_params(overrides=None):
    """``SegmentationParams`` with config overrides applied (unknown names are errors)."""
    from khe_vol.segment import SegmentationParams

    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(SegmentationParams)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown segmentation parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return SegmentationParams(**overrides)


def base_record(participant_id, session_id, month):
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


def _lesion_mask(series, seed_ras_mm, reader_mask_path, reference, params_overrides, record):
    if reader_mask_path is not None:
        mask, mask_image = reader_mask_on_grid(reader_mask_path, series)
        record.update(method=METHOD_READER, reader_mask_file=str(reader_mask_path),
                      reader_mask_sha256=mask_image.sha256)
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

    from khe_vol.segment import SegmentationError, segment_from_seed
    from khe_vol.track import track_followup

    params = segmentation_params(params_overrides)
    record["parameters"] = dataclasses.asdict(params)
    record["method"] = METHOD_AUTO
    try:
        if seed_ras_mm is not None:
            seed = [float(v) for v in seed_ras_mm]
            record["seed_ras_mm"] = seed
            if seed_voxel(seed, series.affine, series.data.shape) is None:
                raise SeriesError(
                    f"{series.path}: seed ({seed[0]:.1f}, {seed[1]:.1f}, {seed[2]:.1f}) RAS+ mm lies outside "
                    f"the image (it covers {_fov_text(series.data.shape, series.affine)}); check the seeds "
                    "table uses scanner RAS+ mm (LPS values need x and y negated)"
                )
            mask, info = segment_from_seed(series.data, series.affine, seed, params)
            return mask, info
        ref_record = reference["record"]
        record["reference_session_id"] = ref_record["session_id"]
        if ref_record["status"] != "ok":
            raise SeriesError(
                f"{series.path}: cannot track the lesion because its reference session "
                f"{ref_record['session_id']} failed: {ref_record['message']}"
            )
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
        mask, info = track_followup(series.data, series.affine, ref_series.data, ref_series.affine, ref_mask, params)
        return mask, info
    except SegmentationError as exc:
        raise SeriesError(f"{series.path}: automatic segmentation failed: {exc}") from exc

