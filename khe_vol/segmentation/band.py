"""Band segmentation: lesion tissue between the model's lower threshold and the fluid
level, fluid plateaus, enclosed cores, shape clean-up, the isodata-like iteration and
the threshold band (volumes re-segmented with shifted thresholds)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from khe_vol.segmentation.edges import refine_edges
from khe_vol.segmentation.intensity import update_model
from khe_vol.segmentation.labels import label_detrended_sd, label_extrema, label_sums, select_labels
from khe_vol.segmentation.morphology import (
    closing_mm,
    component_near,
    components_touching,
    dilate_mm,
    distance_outside_mm,
    fill_lesion_holes,
    grow_voxels,
    mask_box,
    opening_mm,
    within_mm,
)


def enclosure_fraction(region, spacing_mm, reach_mm):
    """Fraction of 26 directions in which ``region`` lies within ``reach_mm`` of each voxel.

    A ray is cast from every voxel along each of the 26 grid directions
    (faces, edges and corners of the neighbouring cube); it hits when a voxel
    of ``region`` lies on it within ``reach_mm`` (physical distance, so
    anisotropic grids behave alike). A cavity the lesion wraps around is hit
    in most directions even where it opens to the outside; tissue beside the
    lesion in at most about half.

    Parameters
    ----------
    region : ndarray of bool
    spacing_mm : (3,) float
    reach_mm : float

    Returns
    -------
    ndarray of float32
        In [0, 1].
    """
    spacing = np.asarray(spacing_mm, float)
    count = np.zeros(region.shape, np.uint8)
    for d in itertools.product((-1, 0, 1), repeat=3):
        if not any(d):
            continue
        steps = int(within_mm(reach_mm) // float(np.linalg.norm(np.asarray(d) * spacing)))
        hit = np.zeros(region.shape, bool)
        for k in range(1, steps + 1):
            # voxel v is hit when region[v + k d] is set
            src = tuple(slice(max(k * o, 0), n + min(k * o, 0)) for o, n in zip(d, region.shape))
            dst = tuple(slice(max(-k * o, 0), n + min(-k * o, 0)) for o, n in zip(d, region.shape))
            hit[dst] |= region[src]
        count += hit
    return count.astype(np.float32) / 26.0


def enclosed_core(region, seed_ijk, spacing_mm, params):
    """The core around a seed that the lesion wraps around (necrosis open to the outside).

    A seed outside the segmented lesion lies on dark tissue: a necrotic or
    cystic core the reader took for lesion. Hole filling takes in a core the
    lesion closes completely; one that opens to the outside of the organ (or
    to fluid) is taken in when the lesion surrounds it in at least
    ``core_enclosure_fraction`` of directions within ``core_reach_mm``: the
    connected part of such voxels at the seed.

    Parameters
    ----------
    region : ndarray of bool
    seed_ijk : tuple of int
    spacing_mm : (3,) float
    params : SegmentationParams

    Returns
    -------
    ndarray of bool
        The core (not overlapping ``region``); empty when the seed is not
        enclosed.
    """
    empty = np.zeros(region.shape, bool)
    if params.core_reach_mm <= 0 or not region.any() or region[tuple(seed_ijk)]:
        return empty
    box = mask_box(region, spacing_mm, params.core_reach_mm)
    seed_box = tuple(int(i - s.start) for i, s in zip(seed_ijk, box))
    if not all(0 <= i < s.stop - s.start for i, s in zip(seed_box, box)):
        return empty
    sub = region[box]
    enclosed = (enclosure_fraction(sub, spacing_mm, params.core_reach_mm) >= params.core_enclosure_fraction) & ~sub
    labels, _ = ndimage.label(enclosed)
    if labels[seed_box] == 0:
        return empty
    out = empty
    out[box] = labels == labels[seed_box]
    return out


def fluid_plateaus(smoothed, upper, max_sd, min_height_sd):
    """Flat plateaus above ``upper``, like fluid.

    Candidates (above ``upper``) are eroded by one voxel before labelling, so
    partial-volume bridges between a fluid collection and bright lesion
    tissue next to it break and each is judged on its own interior. A part
    is a plateau when its interior is flat (standard deviation about a
    linear trend at most ``max_sd``) and stands clear of the threshold (mean
    at least ``min_height_sd`` such standard deviations above it): a patch
    of smooth lesion heterogeneity crossing the threshold has its values
    spread from the threshold up, fluid sits well above it with only noise.
    The trend is taken out because bias correction leaves a few percent of
    field across a fluid collection, and on fluid two to three times as
    bright as the lesion that alone exceeded ``max_sd`` (on a small field of
    view, where N4 has few samples, fluid then joined the lesion). Plateaus
    are returned grown back by one voxel within the candidates.

    Parameters
    ----------
    smoothed : ndarray
    upper : float
    max_sd : float
    min_height_sd : float

    Returns
    -------
    ndarray of bool
    """
    candidates = smoothed > upper
    cube = np.ones((3, 3, 3), bool)
    interior = ndimage.binary_erosion(candidates, structure=cube)
    labels, n = ndimage.label(interior)
    if n == 0:
        return np.zeros(smoothed.shape, bool)
    count = label_sums(labels, n, interior)
    mean = label_sums(labels, n, interior, smoothed) / count
    sd = label_detrended_sd(smoothed, labels, n, interior)
    flat = (count >= 8) & (sd <= max_sd) & (mean - upper >= min_height_sd * sd)
    plateaus = select_labels(labels, flat)
    return grow_voxels(plateaus) & candidates


def fluid_mask(smoothed, model, params):
    """Fluid under an intensity model: :func:`fluid_plateaus` less the lesion's bright nodules.

    A flat bright patch whose face neighbours are at least
    ``nodule_border_fraction`` lesion-level tissue (at or above the lower
    threshold) sits within the lesion: it is a nodule of the lesion's own
    heterogeneity, flat where it saturates, not fluid. Fluid touches the
    lesion along part of its surface only, and meets muscle and fat (below
    the lower threshold) along the rest. Why: a lesion's brightest nodules
    can lie within a few percent of the contrast of the dimmest fluid, so
    level and flatness alone cannot tell them apart; taken for fluid, a
    nodule was cut out with its rim, and the lobe behind it was lost (up to
    a fifth of a phantom lesion), which also lowered ``L`` and ``sd`` and
    so the upper threshold: which state the estimate settled in depended
    on where the seed lay.

    Parameters
    ----------
    smoothed : ndarray
    model : IntensityModel
    params : SegmentationParams

    Returns
    -------
    ndarray of bool
    """
    fluid = fluid_plateaus(
        smoothed, model.upper(params), params.fluid_max_sd * model.contrast, params.fluid_height_sd
    )
    if not fluid.any() or params.nodule_border_fraction > 1:
        return fluid
    box = mask_box(fluid, np.ones(3), 1)  # the plateaus and their face neighbours only
    tissue = (smoothed[box] >= model.lower(params)) & ~fluid[box]
    fluid[box] &= ~enclosed_components(fluid[box], tissue, params.nodule_border_fraction)
    return fluid


def interior_sd_contrast(smoothed, region, model):
    """How flat a region is inside: the fluid test's measure, applied to a segmented lesion.

    The standard deviation of ``smoothed`` about a linear trend over the
    region's interior (eroded by one voxel, as :func:`fluid_plateaus` judges a
    plateau), in the region's own contrasts ``L - B``. Lesion tissue has
    texture (about 0.12 on the phantoms); a fluid collection is flat but for
    noise (under 0.01): a seed on a cyst or an effusion segments the
    collection as a "lesion" of its own level, and only its flatness tells.

    Parameters
    ----------
    smoothed : ndarray
        Bias-corrected, smoothed intensities (image units).
    region : ndarray of bool
        The segmented lesion, on ``smoothed``'s grid.
    model : IntensityModel
        The model that produced ``region``.

    Returns
    -------
    float or None
        None when the interior holds fewer than 8 voxels or the contrast is not positive.
    """
    interior = ndimage.binary_erosion(region, structure=np.ones((3, 3, 3), bool))
    if np.count_nonzero(interior) < 8 or model.contrast <= 0:
        return None
    labels = interior.astype(np.int32)
    return float(label_detrended_sd(smoothed, labels, 1, interior)[0] / model.contrast)


def seed_in_fluid(smoothed, region, model, seed_ijk, spacing_mm, params):
    """Whether a seed lies on tissue a lesion model calls fluid (:func:`fluid_mask`).

    Outside the segmented region, under the model that produced it: a seed on
    fluid beside the lesion. Inside it, under the model of the region's
    darker part (its intensities split in two by Otsu's threshold; that
    part's median level and standard deviation): a seed on fluid touching the
    lesion fits the intensity model to the fluid, and the region becomes the
    fluid with a slice of the lesion joined to it (11 mL of a 55 mL phantom
    lesion), which the final model cannot call fluid but the lesion part's
    model does. A seed in the darker part is not on fluid; lesion texture is
    not flat, and a bright nodule the lesion encloses is no fluid
    (:func:`fluid_mask`'s nodule rule), so a seed in a lesion is not told so.

    Parameters
    ----------
    smoothed : ndarray
        Bias-corrected, smoothed intensities.
    region : ndarray of bool
        The segmented lesion on ``smoothed``'s grid.
    model : IntensityModel
        The model that produced ``region``.
    seed_ijk : tuple of int
        The seed voxel on ``smoothed``'s grid.
    spacing_mm : (3,) float
    params : SegmentationParams

    Returns
    -------
    bool
    """
    seed_ijk = tuple(int(i) for i in seed_ijk)
    if not region[seed_ijk]:
        return bool(fluid_mask(smoothed, model, params)[seed_ijk])
    values = smoothed[region]
    if values.size < 16 or values.min() == values.max():
        return False
    split = threshold_otsu(values)
    if smoothed[seed_ijk] < split:
        return False
    darker = values[values < split]
    lesion_part = replace(model, lesion=float(np.median(darker)), lesion_sd=float(np.std(darker)))
    if lesion_part.contrast <= 0:
        return False
    # The plateaus the region holds and their rim: a box around it, as fluid_beside looks.
    box = mask_box(region, spacing_mm, params.shell_outer_mm + 2 * float(np.max(spacing_mm)))
    seed_box = tuple(i - b.start for i, b in zip(seed_ijk, box))
    return bool(fluid_mask(smoothed[box], lesion_part, params)[seed_box])


def fluid_beside(smoothed, model, region, spacing_mm, params):
    """The fluid plateaus the lesion was told apart from: each one touching it, with its volume and level.

    The fluid test (:func:`fluid_mask`) leaves out flat tissue above the upper
    threshold next to the lesion. When such tissue is barely brighter than
    the lesion (within a fraction of the contrast), it may be fluid, or a
    bright lobe of the lesion itself that the test took for fluid; which one
    it was decided may be a third of the volume, and only a reader can tell.

    Parameters
    ----------
    smoothed : ndarray
    model : IntensityModel
        The model that produced ``region``.
    region : ndarray of bool
        The lesion found.
    spacing_mm : (3,) float
    params : SegmentationParams

    Returns
    -------
    list of dict
        ``n_voxels`` and ``level_above_lesion`` (its mean minus the lesion
        level, in lesion contrasts ``L - B``), one per plateau within two
        voxels of the lesion, largest first.
    """
    if not region.any() or model.contrast <= 0:
        return []
    box = mask_box(region, spacing_mm, params.shell_outer_mm + 2 * float(np.max(spacing_mm)))
    fluid = fluid_mask(smoothed[box], model, params)
    if not fluid.any():
        return []
    near = grow_voxels(region[box], 2)
    labels, n = ndimage.label(fluid)
    touching = np.zeros(n + 1, bool)
    touching[labels[near & fluid]] = True
    touching[0] = False
    where = labels > 0
    count = label_sums(labels, n, where)
    mean = label_sums(labels, n, where, smoothed[box]) / np.maximum(count, 1)
    found = [{"n_voxels": int(count[k - 1]),
              "level_above_lesion": round(float((mean[k - 1] - model.lesion) / model.contrast), 4)}
             for k in np.flatnonzero(touching)]
    return sorted(found, key=lambda item: -item["n_voxels"])


def enclosed_components(candidates, region, min_fraction):
    """Components of ``candidates`` mostly surrounded by ``region``.

    Parameters
    ----------
    candidates : ndarray of bool
    region : ndarray of bool
    min_fraction : float
        Keep a component when at least this fraction of the voxels bordering
        it (face neighbours) belong to ``region``.

    Returns
    -------
    ndarray of bool
    """
    labels, n = ndimage.label(candidates & ~region)
    if n == 0:
        return np.zeros(region.shape, bool)
    # Each bordering voxel takes the label of a component it touches.
    border_labels = ndimage.grey_dilation(labels, footprint=ndimage.generate_binary_structure(3, 1))
    border = (border_labels > 0) & (labels == 0)
    total = label_sums(border_labels, n, border)
    inside = label_sums(border_labels, n, border, region)
    frac = np.divide(inside, total, out=np.zeros(n), where=total > 0)
    return select_labels(labels, frac >= min_fraction)


def restorable(removed, core, spacing_mm, params):
    """Parts cut off by the opening that belong back on the lesion.

    A part that stays within ``restore_max_mm`` of the core (a small lobe or
    the tip of a protrusion) is restored whole; of a part reaching further
    (a vessel running past, a bridge to other tissue) only what lies within
    ``restore_radius_mm`` of the core.

    Parameters
    ----------
    removed : ndarray of bool
        What the opening removed from the candidate mask.
    core : ndarray of bool
        What survived it and was kept.

    Returns
    -------
    ndarray of bool
    """
    dist = distance_outside_mm(core, spacing_mm)
    labels, n = ndimage.label(removed)
    if n == 0:
        return np.zeros(core.shape, bool)
    nearest, farthest = label_extrema(dist, labels, n, removed)
    touching = nearest <= float(np.max(spacing_mm)) * 1.01
    whole = select_labels(labels, touching & (farthest <= within_mm(params.restore_max_mm)))
    part = select_labels(labels, touching) & (dist <= within_mm(params.restore_radius_mm))
    return components_touching(whole | part | core, core) & ~core


def band_segmentation(smoothed, model, start, spacing_mm, params, search_radius_mm=0.0):
    """Lesion mask from the intensity model and shape priors, grown from ``start``.

    Parameters
    ----------
    smoothed : ndarray
        Bias-corrected, smoothed intensities.
    model : IntensityModel
    start : tuple of int or ndarray of bool
        Seed voxel (the nearest component within ``search_radius_mm`` is
        kept), or a mask (the components overlapping it are kept).
    spacing_mm : (3,) ndarray
    params : SegmentationParams
    search_radius_mm : float

    Returns
    -------
    ndarray of bool
        Empty when nothing is found.
    """
    fluid = fluid_mask(smoothed, model, params)
    band = (smoothed >= model.lower(params)) & ~fluid
    closed = closing_mm(band, spacing_mm, params.closing_radius_mm) & ~fluid
    opened = opening_mm(closed, spacing_mm, params.opening_radius_mm)
    if isinstance(start, np.ndarray):
        core = components_touching(opened, start)
    else:
        core = component_near(opened, start, spacing_mm, search_radius_mm)
    if not core.any():
        return core
    # Lobes walled off by a septum too thick for the closing are lesion too:
    # take in parts of the opened band within ``septum_gap_mm``.
    if params.septum_gap_mm > 0:
        for _ in range(3):
            grown = components_touching(opened, dilate_mm(core, spacing_mm, params.septum_gap_mm))
            if grown.sum() == core.sum():
                break
            core = grown
    region = core | restorable(closed & ~opened, core, spacing_mm, params)
    inside = enclosed_components(fluid, region, params.enclosure_fraction)
    region |= inside
    beside = fluid & ~inside
    if beside.any():
        # Fluid beside the lesion: drop the voxels touching it, its
        # partial-volume rim rather than lesion.
        rim = grow_voxels(beside)
        region = components_touching(region & ~rim, core & ~rim)
    return fill_lesion_holes(region, spacing_mm, params)


def thick_low_band(smoothed, model, region, spacing_mm, params):
    """Thick dimmer tissue touching the lesion, below its threshold (off by default).

    Candidates are the voxels outside ``region`` at or above
    ``B + low_band_fraction * (L - B)``, fluid plateaus and the voxel rim
    around them excluded. They are opened on their own by a ball of
    ``low_band_min_thickness_mm`` (mm, so anisotropic grids behave alike),
    and the parts left that touch the lesion are returned. Why: a lower
    threshold alone reaches the oedema that real whole-tumour outlines
    include (FLAIR), but also KHE's thin oedema rim (2.5-4 mm), which must
    stay out; only tissue too thick to be such a rim survives the opening.
    Why off: on six BraTS 2013 FLAIR cases (fraction 0.3, 4 mm) Dice moved
    by -0.003 to +0.017, since most of what the outlines add beyond the
    half-way edge is a 1-2 mm margin, not thick tissue, and at lower
    fractions or thinner openings grey matter and, on the phantoms, vessels
    and the rim came in (one 5 mm slice of rim passes a 3-4 mm opening).

    Parameters
    ----------
    smoothed : ndarray
    model : IntensityModel
    region : ndarray of bool
    spacing_mm : (3,) ndarray
    params : SegmentationParams

    Returns
    -------
    ndarray of bool
        Not overlapping ``region``; empty when turned off.
    """
    if params.low_band_fraction <= 0 or params.low_band_min_thickness_mm <= 0 or not region.any():
        return np.zeros(region.shape, bool)
    fluid = fluid_mask(smoothed, model, params)
    if fluid.any():
        fluid = grow_voxels(fluid)
    low = smoothed >= model.surround + params.low_band_fraction * model.contrast
    thick = opening_mm(low & ~region & ~fluid, spacing_mm, params.low_band_min_thickness_mm)
    touching = ndimage.binary_dilation(region, structure=ndimage.generate_binary_structure(3, 1))
    return components_touching(thick, touching)


def with_low_band(smoothed, model, region, spacing_mm, params):
    """``region`` with its :func:`thick_low_band` added and holes filled."""
    extra = thick_low_band(smoothed, model, region, spacing_mm, params)
    if not extra.any():
        return region
    return fill_lesion_holes(region | extra, spacing_mm, params)


def iterate_segmentation(smoothed, model, start, spacing_mm, params, search_radius_mm=0.0):
    """Alternate band segmentation and re-estimation of the intensity model.

    Later passes run on the bounding box of the lesion plus a margin, which
    keeps the cost proportional to the lesion rather than the region. The
    :func:`thick_low_band` (off by default) is added to the final region.

    Returns
    -------
    region : ndarray of bool
    model : IntensityModel
        The model that produced ``region``.
    history : list of dict
    """
    region = band_segmentation(smoothed, model, start, spacing_mm, params, search_radius_mm)
    history = [{**model.as_dict(params), "n_voxels": int(region.sum())}]
    if not region.any():
        return region, model, history
    contrast0 = model.contrast
    margin_mm = params.shell_outer_mm + params.opening_radius_mm + 10.0
    for _ in range(int(params.threshold_iterations)):
        new_model = update_model(model, smoothed, region, spacing_mm, params)
        if new_model.contrast < 0.5 * contrast0:
            break  # the estimate degenerated; keep the last good region
        moved = max(abs(new_model.lower(params) - model.lower(params)),
                    abs(new_model.upper(params) - model.upper(params)))
        if moved <= params.converged_fraction * model.contrast:
            break  # converged: another pass would redraw the same lesion
        box = mask_box(region, spacing_mm, margin_mm)
        # Later passes keep what overlaps the previous lesion.
        sub = band_segmentation(smoothed[box], new_model, region[box], spacing_mm, params)
        if not sub.any():
            break
        new = np.zeros_like(region)
        new[box] = sub
        model, region = new_model, new
        history.append({**model.as_dict(params), "n_voxels": int(region.sum())})
    return with_low_band(smoothed, model, region, spacing_mm, params), model, history


def threshold_band_ml(smoothed, model, region, spacing_mm, params, voxel_ml, core=None):
    """Lesion volumes with the edge threshold moved either way, in mL.

    The final intensity model and lesion are kept; only where the edge lies
    between lesion and surroundings (``lower_fraction``) moves by
    ``band_fraction_delta``, the doubt of a partial-volume edge. This is one
    half of the volume's uncertainty band (:mod:`khe_vol.segmentation.uncertainty`).

    Parameters
    ----------
    smoothed : ndarray
    model : IntensityModel
        The model that produced ``region``.
    region : ndarray of bool
        The lesion found, on ``smoothed``'s grid.
    spacing_mm : (3,) ndarray
    params : SegmentationParams
    voxel_ml : float
        Volume of one voxel, mL.
    core : ndarray of bool, optional
        An enclosed core taken into ``region`` by :func:`enclosed_core`; it
        is lesion whatever the threshold (it is dark), so it is kept in the
        moved segmentations too.

    Returns
    -------
    list of float
        Volumes with the stricter and the looser threshold (empty for an
        empty region).
    """
    if not region.any():
        return []
    margin_mm = params.shell_outer_mm + params.opening_radius_mm + 10.0
    box = mask_box(region, spacing_mm, margin_mm)
    volumes = []
    for sign in (1, -1):
        fraction = min(max(params.lower_fraction + sign * params.band_fraction_delta, 0.05), 0.95)
        moved = replace(params, lower_fraction=fraction)
        sub = band_segmentation(smoothed[box], model, region[box], spacing_mm, moved)
        sub = with_low_band(smoothed[box], model, sub, spacing_mm, moved)
        if sub.any():
            sub = refine_edges(smoothed[box], sub, spacing_mm, moved)
        if core is not None and core.any():
            sub = fill_lesion_holes(sub | core[box], spacing_mm, params)
        volumes.append(float(sub.sum() * voxel_ml))
    return volumes
