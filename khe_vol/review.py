"""When a result may be wrong: review reasons, and whether a reader must look.

A measurement that says "look at me" is usable; a wrong category that says
``status=ok`` is not. Every per-series record carries ``review``: a list of
``{"reason": <code>, "detail": <text>}`` found while it was measured (a seed
outside bright lesion tissue, a follow-up stored on another intensity scale,
...). Reasons that follow from the record's own numbers (thick slices, a wide
uncertainty band, an automatic 0 mL) are derived here, so the tables, the
reader worklists and the report all see the same list.

A reason stays listed after a blinded reader has decided the volume, but
``needs_review`` is then 0: the reader has looked.
"""

from __future__ import annotations

import numpy as np

#: Slices thicker than this (mm) make partial volume dominate a KHE lesion's
#: boundary; RECIST 1.1 asks for <= 5 mm for volumetric and diameter measures.
THICK_SLICE_MM = 5.0

#: Uncertainty bands wider than this share of the volume
#: ((volume_high_ml - volume_low_ml) / volume_ml) are flagged. On the phantom
#: benchmark the median band is about 16 % of the volume wide.
WIDE_BAND_SHARE = 0.5

#: Automatic masks with more than this share of their voxels much brighter than the lesion's own
#: level (:func:`khe_vol.segmentation.intensity.bright_share`) are flagged. On the phantom benchmark
#: it is at most about 2 %; masks that took in adjacent fluid hold 15 % or more.
BRIGHT_SHARE = 0.05

#: Fluid left out beside the lesion whose level is within this many lesion contrasts ``L - B``
#: above the lesion level may be lesion (a bright lobe taken for fluid: a third of a phantom
#: lesion was lost so, silently) as well as fluid; cysts and effusions on fat-suppressed T2
#: stand further above a KHE lesion.
FLUID_NEAR_LESION_CONTRAST = 0.5

#: ...when it amounts to at least this share of the lesion's volume (a few voxels of a
#: saturated nodule at the edge are not worth a reader's look).
FLUID_NEAR_LESION_SHARE = 0.05

#: A seeded lesion whose interior varies less than this share of its contrast ``L - B`` (about a
#: linear trend, :func:`khe_vol.segmentation.band.interior_sd_contrast`) is as flat as fluid: a
#: fluid collection segmented from a seed on it measures 0.008-0.012, the demo and phantom lesions
#: 0.09-0.15 (their texture); the fluid test's own limit (``fluid_max_sd``, 0.08) lies too near those.
SEED_FLUID_FLAT_SD = 0.04

#: The learned and the classical engine disagree when their volumes differ by more than this share
#: of the classical volume (``segmentation.engines_disagree_fraction`` sets it per study; this is
#: its default, and the response categories are 20 % apart).
ENGINES_DISAGREE_FRACTION = 0.2

#: Every review reason, with what it means and what a coordinator does about it. The reader app
#: shows these texts, so they name no session label ("baseline", "m06", ...): the leak audit refuses it.
REVIEW_REASONS = {
    "automatic_zero_volume": (
        "automatic tracking found no lesion (0 mL); KHE rarely resolves completely, "
        "so a reader confirms every automatic 0 mL"
    ),
    "near_threshold": "the response category could flip within the volume uncertainty bands",
    "seed_not_in_lesion_tissue": (
        "the seed lies in tissue darker than bright lesion tissue (fat, muscle, a vessel or fluid); "
        "check the seed is inside the lesion"
    ),
    "seed_on_fluid": (
        "the seed lies on fluid (a cyst, an effusion, the bladder): on tissue the lesion model calls fluid, or on a "
        "structure as flat as fluid that was segmented as the lesion; every session tracked from that one carries "
        "the flag too. Check the seed is on the lesion, move it and rerun"
    ),
    "intensity_scale_differs": (
        "this follow-up stores intensities on another scale than its reference session (an offset, an "
        "inverted sign, z-scoring, or negative values in one session only; a plain gain is not flagged); "
        "it was segmented after mapping its intensities onto the reference's: check the mask"
    ),
    "thick_slices": f"slices thicker than {THICK_SLICE_MM:g} mm: partial volume makes the volume uncertain",
    "wide_band": (
        f"the volume uncertainty band is wider than {WIDE_BAND_SHARE:.0%} of the volume"
    ),
    "geometry_disagrees": "the NIfTI sform and qform place the image differently; the sform was used",
    "baseline_needs_review": "the baseline this follow-up is compared with needs review",
    "bright_inclusion": (
        f"more than {BRIGHT_SHARE:.0%} of the automatic mask is much brighter than the rest of the lesion: "
        "fluid (a cyst, an effusion, the bladder) or a vessel may have joined it; check the mask's edges "
        "and exclude what is not lesion"
    ),
    "fluid_near_lesion_level": (
        "tissue next to the lesion, at least "
        f"{FLUID_NEAR_LESION_SHARE:.0%} of its volume, was left out as fluid although it is barely brighter than "
        f"the lesion (within {FLUID_NEAR_LESION_CONTRAST:g} of the lesion contrast): it may be a bright part of "
        "the lesion; check the mask there and include it if it is lesion"
    ),
    "engines_disagree": (
        "the learned and the classical engine measure this lesion differently (by more than "
        f"{ENGINES_DISAGREE_FRACTION:.0%} by default): two independent methods disagree, so a reader checks "
        "the mask, above all its edges and its first and last slices"
    ),
}


def flag(record, reason, detail):
    """Add a review reason to a per-series record (once per reason).

    Parameters
    ----------
    record : dict
        A per-series record; ``record["review"]`` is created if missing.
    reason : str
        A key of :data:`REVIEW_REASONS`.
    detail : str
        What was found, with numbers and units, for the coordinator.
    """
    if reason not in REVIEW_REASONS:
        raise ValueError(f"unknown review reason {reason!r}")
    review = record.setdefault("review", [])
    if all(item["reason"] != reason for item in review):
        review.append({"reason": reason, "detail": detail})


def slice_thickness_mm(affine):
    """Largest voxel edge of a grid (the slice spacing of a 2D acquisition), mm."""
    return float(np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0)).max())


def series_reasons(record):
    """Review reasons of one series: those found while measuring plus those its numbers imply.

    Parameters
    ----------
    record : dict
        A per-series record (``status`` ok or error).

    Returns
    -------
    list of dict
        ``{"reason", "detail"}`` in a fixed order (by reason code).
    """
    out = {item["reason"]: item for item in record.get("review") or []}
    if record.get("status") == "ok":
        if record.get("affine") is not None:
            thickness = slice_thickness_mm(record["affine"])
            if thickness > THICK_SLICE_MM:
                out.setdefault("thick_slices", {
                    "reason": "thick_slices",
                    "detail": f"voxel edge {thickness:.1f} mm > {THICK_SLICE_MM:g} mm",
                })
        volume, low, high = (record.get(k) for k in ("volume_ml", "volume_low_ml", "volume_high_ml"))
        if volume and low is not None and high is not None and (high - low) > WIDE_BAND_SHARE * volume:
            out.setdefault("wide_band", {
                "reason": "wide_band",
                "detail": f"band {low:.1f}-{high:.1f} mL around {volume:.1f} mL",
            })
        if record.get("n_voxels") == 0 and record.get("reference_session_id") and record.get("method") == "auto":
            out.setdefault("automatic_zero_volume", {
                "reason": "automatic_zero_volume",
                "detail": f"tracked from {record['reference_session_id']} and found 0 mL",
            })
    return [out[k] for k in sorted(out)]


def reader_decided(record):
    """Whether a blinded reader's read decided this series' final volume."""
    return ":" in str(record.get("volume_source") or "")


def reason_text(reasons):
    """``review_reason`` column value: codes joined by ``;`` (None when there are none)."""
    return ";".join(item["reason"] for item in reasons) or None
