"""Seeded segmentation of a T2-hyperintense lesion (KHE) on its native grid.

Method (every distance in mm, so anisotropic, oblique and flipped grids
behave alike)
-----------------------------------------------------------------------
1. **Region of interest.** A box of half-width ``max_radius_mm`` around the
   seed, spanning the whole image along axes at most ``whole_axis_mm`` long;
   everything below runs on it only. Where the image is larger, the box is
   re-centred on the lesion found and steps 2-5 redone
   (``recentre_passes``). Either way, where the box cuts the image, and with
   it the bias field and the tissue level, does not depend on where in the
   lesion the reader clicked.
2. **Bias field.** N4 (SimpleITK) fitted on a copy shrunk to about
   ``n4_spacing_mm`` voxels, its field applied at full resolution; then a
   light Gaussian of ``smoothing_sigma_mm``. Data with negative values are
   already normalised (e.g. z-scores) and are left alone.
3. **Intensity model.** ``L`` is the lesion level (median of the current
   lesion), ``B`` the level of the ordinary tissue it displaces (the mode of
   the region's histogram above its dark class), ``c = L - B`` the
   contrast. Lesion tissue is
   ``I >= B + lower_fraction * c``: half-way between lesion and
   surroundings is the unbiased edge for partial-volume voxels, and sits
   above an oedema rim. Flat regions (``fluid_max_sd``) above
   ``L + max(fluid_fraction * c, fluid_sd_factor * sd)`` are fluid: fluid
   beside the lesion is excluded with its partial-volume rim, while a
   bright core the lesion surrounds (``enclosure_fraction``) is kept, as is
   bright heterogeneous tissue and a flat bright nodule bordered almost all
   round by lesion-level tissue (``nodule_border_fraction``). ``L`` and ``sd`` are re-estimated
   from the segmentation ``threshold_iterations`` times (an isodata-like
   local threshold).
4. **Shape.** A closing of ``closing_radius_mm`` bridges thin dark septa, an
   opening of ``opening_radius_mm`` cuts bridges to touching vessels, the
   component at the seed is kept and what the opening took from it restored
   (``restore_radius_mm``, ``restore_max_mm``); parts walled off by a
   thick septum within ``septum_gap_mm`` join it; holes (flow voids, septa,
   necrosis) are filled in 3D and slice by slice; a core at the seed that
   the lesion surrounds in most directions but does not close (necrosis
   open to the outside) is taken in too (``core_enclosure_fraction``).
5. **Edges.** A marker watershed of the gradient magnitude
   (``edge_sigma_mm``) moves the boundary by up to one voxel onto the
   steepest edge, along the finely sampled axes only.

The same band segmentation, started from a registered reference lesion
instead of a seed, finds the lesion again in follow-ups
(:mod:`khe_vol.track`).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage.filters import threshold_multiotsu
from skimage.segmentation import watershed

from khe_vol.geometry import (
    from_sitk,
    seed_voxel,
    to_sitk,
    voxel_sizes_mm,
    voxel_to_world,
)


class SegmentationError(ValueError):
    """Segmentation cannot be done; the message says why in coordinator terms."""


@dataclass(frozen=True)
class SegmentationParams:
    """Every tunable of :func:`segment_from_seed` and :func:`khe_vol.track.track_followup`.

    Attributes
    ----------
    max_radius_mm : float
        Half-width of the box searched around the seed, mm. A lesion reaching
        further is cut at the box (``info["touches_roi_border"]``).
    whole_axis_mm : float
        Along an axis where the image is at most this long, mm, the box spans
        the whole image: cropping it would save little, and where the box cuts
        the image would depend on where the seed lies.
    recentre_passes : int
        Elsewhere, the box is re-centred on the lesion found (the centre of its
        bounding box) and the segmentation redone, until the box stays put
        or this many times, so the result does not depend on where in the
        lesion the seed lies (0 = the box stays centred on the seed).
    seed_search_radius_mm : float
        Lesion tissue must lie within this distance of the seed, mm (a seed
        on a flow void, septum or necrosis still works).
    min_contrast : float
        The lesion must be brighter than its surroundings by at least this
        many robust standard deviations of ordinary tissue; otherwise the
        seed is not on hyperintense tissue.
    bias_correction : bool
        Run N4 bias-field correction on the region of interest.
    n4_spacing_mm : float
        Voxel size the region is shrunk to for fitting N4, mm.
    n4_iterations : int
        N4 iterations at each fitting level.
    n4_levels : int
        N4 B-spline fitting levels.
    smoothing_sigma_mm : float
        Gaussian smoothing before thresholding, mm.
    lower_fraction : float
        Lower threshold ``B + lower_fraction * (L - B)``.
    fluid_fraction, fluid_sd_factor : float
        Upper threshold ``L + max(fluid_fraction * (L - B), fluid_sd_factor *
        sd)``, ``sd`` the robust standard deviation of the lesion signal:
        above it, tissue may be fluid (a heterogeneous lesion keeps its
        bright parts below it)...
    fluid_max_sd, fluid_height_sd : float
        ...and it is fluid when it is a plateau: standard deviation inside
        it at most ``fluid_max_sd * (L - B)`` (bright oedema, necrosis or
        haemorrhage belonging to a lesion is not flat), and mean at least
        ``fluid_height_sd`` of those standard deviations above the threshold
        (a patch of smooth lesion heterogeneity crossing it is not)...
    enclosure_fraction : float
        ...and not surrounded by the lesion: a flat bright region at least
        this fraction of whose bordering voxels are lesion is a bright core
        and kept...
    nodule_border_fraction : float
        ...and not a bright nodule of the lesion: a flat bright region at
        least this fraction of whose bordering voxels are at or above the
        lower threshold is lesion (:func:`fluid_mask`); above 1 turns this off.
    converged_fraction : float
        The re-estimation stops early once the thresholds move by at most
        this fraction of the contrast ``L - B`` (on the throughput cohort
        they settle within 0.1 % after one pass).
    threshold_iterations : int
        Re-estimations of ``L`` and ``sd`` from the segmentation.
    shell_inner_mm, shell_outer_mm : float
        ``sd`` is measured at least ``shell_inner_mm`` inside the lesion (away
        from partial volume); ``shell_outer_mm`` is part of the margin of the
        box later passes run on, mm.
    closing_radius_mm : float
        Closing radius bridging thin dark septa inside the lesion, mm.
    opening_radius_mm : float
        Opening radius cutting bridges to vessels, mm: parts thinner than
        twice this are cut off the lesion.
    septum_gap_mm : float
        Parts of the lesion left after the opening that lie within this
        distance of the seed's part are joined to it (lobes walled off by a
        septum), mm.
    band_fraction_delta : float
        For the volume's uncertainty band, the segmentation is redone with
        ``lower_fraction`` moved by this much either way (a stricter and a
        looser edge; see :func:`threshold_band_ml`).
    restore_radius_mm, restore_max_mm : float
        A part removed by the opening is put back whole when it lies within
        ``restore_max_mm`` of what survived (a small lobe, a protrusion);
        otherwise (a vessel, a bridge) only within ``restore_radius_mm`` of
        it, below the vessel gap, so a cut-off vessel stays cut off.
    fill_holes_slicewise : bool
        Also fill holes in each slice (flow voids running through slices).
    track_margin_mm : float
        Follow-ups: the lesion is searched for within this distance of the
        registered reference lesion, mm.
    track_erosion_mm : float
        Follow-ups: the reference lesion is eroded by this much before it
        seeds the search, mm, so a registration error does not start the
        search on neighbouring tissue.
    min_lesion_ml : float
        Follow-ups: residual lesion smaller than this is taken as noise, mL.
    registration_spacing_mm : float
        Follow-ups: finest voxel size used by the rigid registration, mm.
    core_reach_mm, core_enclosure_fraction : float
        A seed left outside the lesion (on a necrotic or cystic core that
        opens to the outside, so hole filling misses it): the voxels around
        it that the lesion surrounds within ``core_reach_mm`` (mm) in at
        least this fraction of 26 directions are lesion
        (:func:`enclosed_core`); ``core_reach_mm`` 0 turns this off.
    low_band_fraction, low_band_min_thickness_mm : float
        Thick low band (:func:`thick_low_band`): tissue above
        ``B + low_band_fraction * (L - B)`` touching the lesion is added
        where it survives an opening of ``low_band_min_thickness_mm`` (mm)
        on its own, so extensive dimmer tissue joins the lesion and a thin
        oedema rim does not. Either 0 turns this off (the default: on the
        benchmark it barely helped, see the function).
    """

    max_radius_mm: float = 90.0
    whole_axis_mm: float = 270.0
    recentre_passes: int = 2
    seed_search_radius_mm: float = 10.0
    min_contrast: float = 2.0
    bias_correction: bool = True
    n4_spacing_mm: float = 8.0
    n4_iterations: int = 30
    n4_levels: int = 3
    smoothing_sigma_mm: float = 0.5
    lower_fraction: float = 0.5
    fluid_fraction: float = 0.25
    fluid_sd_factor: float = 2.0
    fluid_max_sd: float = 0.08
    fluid_height_sd: float = 3.0
    enclosure_fraction: float = 0.6
    nodule_border_fraction: float = 0.8
    threshold_iterations: int = 3
    converged_fraction: float = 0.005
    shell_inner_mm: float = 1.5
    shell_outer_mm: float = 6.0
    closing_radius_mm: float = 1.5
    opening_radius_mm: float = 4.0
    septum_gap_mm: float = 3.0
    restore_radius_mm: float = 1.5
    restore_max_mm: float = 6.0
    band_fraction_delta: float = 0.1
    fill_holes_slicewise: bool = True
    edge_sigma_mm: float = 0.7
    track_margin_mm: float = 15.0
    track_erosion_mm: float = 2.0
    min_lesion_ml: float = 0.1
    registration_spacing_mm: float = 2.0
    core_reach_mm: float = 20.0
    core_enclosure_fraction: float = 0.4
    low_band_fraction: float = 0.0
    low_band_min_thickness_mm: float = 0.0


@dataclass(frozen=True)
class IntensityModel:
    """Lesion intensity model in image units.

    Attributes
    ----------
    lesion : float
        Lesion level ``L``.
    surround : float
        Surrounding tissue level ``B``.
    lesion_sd : float
        Robust standard deviation of the lesion signal.
    dark : float
        Values below this are air, suppressed fat or similar (the dark class
        of the region).
    floor : float
        Ordinary tissue level of the region; re-estimations keep ``B`` at it.
    """

    lesion: float
    surround: float
    lesion_sd: float
    dark: float
    floor: float

    @property
    def contrast(self):
        return self.lesion - self.surround

    def lower(self, params):
        """Lower threshold of lesion tissue."""
        return self.surround + params.lower_fraction * self.contrast

    def upper(self, params):
        """Threshold above which tissue may be fluid."""
        return self.lesion + max(params.fluid_fraction * self.contrast, params.fluid_sd_factor * self.lesion_sd)

    def as_dict(self, params):
        return {
            "lesion_level": float(self.lesion),
            "surrounding_level": float(self.surround),
            "lesion_sd": float(self.lesion_sd),
            "lower_threshold": float(self.lower(params)),
            "upper_threshold": float(self.upper(params)),
        }


# --------------------------------------------------------------------------
# Grids and morphology in millimetres


def crop_box(center_ijk, shape, spacing_mm, radius_mm):
    """Index slices of a box of physical half-width ``radius_mm`` around a voxel.

    Parameters
    ----------
    center_ijk : (3,) int
    shape : (3,) int
    spacing_mm : (3,) float
    radius_mm : float

    Returns
    -------
    tuple of slice
    """
    half = np.ceil(float(radius_mm) / np.asarray(spacing_mm, float)).astype(int)
    lo = np.maximum(np.asarray(center_ijk) - half, 0)
    hi = np.minimum(np.asarray(center_ijk) + half + 1, np.asarray(shape[:3]))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def mask_box(mask, spacing_mm, margin_mm):
    """Bounding box of a mask grown by ``margin_mm``, as index slices."""
    idx = np.argwhere(mask)
    margin = np.ceil(float(margin_mm) / np.asarray(spacing_mm, float)).astype(int)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def crop_affine(affine, slices):
    """Affine of a sub-array ``array[slices]``."""
    out = np.array(affine, dtype=float)
    out[:3, 3] = voxel_to_world([s.start for s in slices], affine)
    return out


#: Balls up to this many voxels are applied as structuring elements; larger
#: ones through a distance transform (whose cost does not grow with radius).
_SMALL_BALL_VOXELS = 125


def ball_structure(spacing_mm, radius_mm):
    """Structuring element of the voxels within ``radius_mm`` of the centre voxel."""
    half = np.floor(float(radius_mm) / np.asarray(spacing_mm, float)).astype(int)
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    return sum((g * s) ** 2 for g, s in zip(grids, spacing_mm)) <= float(radius_mm) ** 2 + 1e-9


def distance_outside_mm(mask, spacing_mm):
    """Distance in mm from each voxel centre to the nearest voxel of ``mask`` (0 inside).

    Exact Euclidean distance on the anisotropic grid (Maurer's algorithm,
    SimpleITK); ``inf`` everywhere if the mask is empty.
    """
    if not mask.any():
        return np.full(mask.shape, np.inf, np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(mask, (2, 1, 0))).astype(np.uint8))
    image.SetSpacing([float(v) for v in spacing_mm])
    dist = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(np.transpose(sitk.GetArrayFromImage(dist), (2, 1, 0)), 0)


def dilate_mm(mask, spacing_mm, radius_mm):
    """Dilation by a ball of ``radius_mm``: voxels within that distance of the mask."""
    if radius_mm <= 0:
        return mask.copy()
    ball = ball_structure(spacing_mm, radius_mm)
    if ball.sum() <= _SMALL_BALL_VOXELS:
        return ndimage.binary_dilation(mask, structure=ball)
    return distance_outside_mm(mask, spacing_mm) <= radius_mm


def erode_mm(mask, spacing_mm, radius_mm):
    """Erosion by a ball of ``radius_mm``; the array border is not background."""
    if radius_mm <= 0:
        return mask.copy()
    ball = ball_structure(spacing_mm, radius_mm)
    if ball.sum() <= _SMALL_BALL_VOXELS:
        return ndimage.binary_erosion(mask, structure=ball, border_value=1)
    padded = np.pad(mask, 1, mode="edge")
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    return distance_outside_mm(~padded, spacing_mm)[inner] > radius_mm


def opening_mm(mask, spacing_mm, radius_mm):
    """Opening by a ball of ``radius_mm``: removes parts thinner than ``2 * radius_mm``."""
    return dilate_mm(erode_mm(mask, spacing_mm, radius_mm), spacing_mm, radius_mm) & mask


def closing_mm(mask, spacing_mm, radius_mm):
    """Closing by a ball of ``radius_mm``: bridges gaps narrower than ``2 * radius_mm``."""
    if radius_mm <= 0:
        return mask.copy()
    pad = np.ceil(radius_mm / np.asarray(spacing_mm, float)).astype(int) + 1
    padded = np.pad(mask, [(int(p), int(p)) for p in pad])
    closed = erode_mm(dilate_mm(padded, spacing_mm, radius_mm), spacing_mm, radius_mm)
    inner = tuple(slice(int(p), int(p) + n) for p, n in zip(pad, mask.shape))
    return closed[inner] | mask


def fill_holes(mask, slice_axis=None):
    """Fill enclosed holes in 3D and, optionally, in every slice along ``slice_axis``."""
    filled = ndimage.binary_fill_holes(mask)
    if slice_axis is not None:
        moved = np.moveaxis(filled, slice_axis, 0)  # a view: filling it fills ``filled``
        for k in np.flatnonzero(moved.any(axis=(1, 2))):
            moved[k] = ndimage.binary_fill_holes(moved[k])
    return filled


def fill_lesion_holes(mask, spacing_mm, params):
    """:func:`fill_holes` in 3D and, if ``params.fill_holes_slicewise``, slice by slice across the thickest axis."""
    return fill_holes(mask, int(np.argmax(spacing_mm)) if params.fill_holes_slicewise else None)


def ball_mask(shape, center_ijk, spacing_mm, radius_mm):
    """Voxels whose centres lie within ``radius_mm`` of a voxel centre."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, center_ijk, spacing_mm))
    return d2 <= radius_mm**2


def component_near(mask, point_ijk, spacing_mm, radius_mm):
    """The connected component of ``mask`` nearest a voxel, if within ``radius_mm``.

    Returns
    -------
    ndarray of bool
        Empty if no component is that close.
    """
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(mask.shape, bool)
    lab = labels[tuple(point_ijk)]
    if lab == 0:
        sub = crop_box(point_ijk, mask.shape, spacing_mm, radius_mm)
        idx = np.argwhere(labels[sub] > 0)
        if idx.size == 0:
            return np.zeros(mask.shape, bool)
        offset = np.array([s.start for s in sub]) - np.asarray(point_ijk)
        dist_mm = np.sqrt((((idx + offset) * spacing_mm) ** 2).sum(axis=1))
        best = int(np.argmin(dist_mm))
        if dist_mm[best] > radius_mm:
            return np.zeros(mask.shape, bool)
        lab = labels[sub][tuple(idx[best])]
    return labels == lab


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
        steps = int(float(reach_mm) // float(np.linalg.norm(np.asarray(d) * spacing)))
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


def components_touching(mask, start):
    """Union of the connected components of ``mask`` that overlap ``start``."""
    labels, n = ndimage.label(mask)
    touched = np.zeros(n + 1, bool)
    touched[labels[start & mask]] = True
    return select_labels(labels, touched[1:])


# Per-label statistics over the labelled voxels only. scipy.ndimage's
# sum_labels/minimum/maximum pass over the whole box each call and were a
# fifth of a series job; these give the same numbers (same summation order).


def select_labels(labels, keep):
    """Voxels whose label is kept; ``keep`` is a bool per label 1..n (background is never kept)."""
    return np.concatenate([[False], np.asarray(keep, bool)])[labels]


def label_sums(labels, n, where, weights=None):
    """Per-label sums of ``weights`` (counts when None) for labels 1..n.

    ``where`` is the boolean mask of the labelled voxels (``labels > 0``),
    passed in because callers already hold it.
    """
    values = None if weights is None else np.asarray(weights, np.float64)[where]
    return np.bincount(labels[where], values, minlength=n + 1)[1:]


def label_extrema(values, labels, n, where):
    """Per-label minimum and maximum of ``values`` for labels 1..n (``where`` as in label_sums)."""
    lab, v = labels[where], np.asarray(values)[where]
    lowest = np.full(n + 1, np.inf)
    highest = np.full(n + 1, -np.inf)
    np.minimum.at(lowest, lab, v)
    np.maximum.at(highest, lab, v)
    return lowest[1:], highest[1:]


# --------------------------------------------------------------------------
# Intensities


@contextlib.contextmanager
def itk_threads(n):
    """Run SimpleITK filters created inside with ``n`` threads by default, then restore."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def correct_bias(roi, roi_affine, params):
    """N4 bias-field correction of a region, fitted on a shrunk copy.

    Parameters
    ----------
    roi : (I, J, K) ndarray
        Magnitude image (non-negative); data with negative values are
        returned unchanged, since a multiplicative field does not apply to
        intensities that were already normalised.
    roi_affine : (4, 4) ndarray
    params : SegmentationParams

    Returns
    -------
    corrected : ndarray of float32
    info : dict
    """
    data = np.asarray(roi, np.float32)
    if float(data.min()) < 0:
        return data, {"bias_correction": "skipped: negative intensities (already normalised)"}
    # N4 works on log intensities: keep zeros (air) off the log by a tiny offset.
    offset = 1e-3 * float(data.max() or 1.0)
    image = to_sitk(data + offset, roi_affine)
    shrink = [max(1, int(round(params.n4_spacing_mm / s))) for s in image.GetSpacing()]
    small = sitk.Shrink(image, shrink)
    # Fit on ordinary tissue only, the middle class of a three-class Otsu
    # split: without air (no signal to correct) and without the lesion and
    # fluid, whose brightness N4 would otherwise partly take for bias.
    values = sitk.GetArrayViewFromImage(small)
    dark, bright = (float(t) for t in threshold_multiotsu(np.asarray(values, np.float32).ravel(), classes=3))
    mask = sitk.BinaryThreshold(small, dark, bright, 1, 0)
    # N4's B-spline fit sums over threads in a thread-count-dependent order,
    # and its inner filters take the global default: one thread makes the
    # field (and every threshold after it) the same on any machine.
    with itk_threads(1):
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations([int(params.n4_iterations)] * int(params.n4_levels))
        corrector.Execute(small, mask)
        log_field, _ = from_sitk(corrector.GetLogBiasFieldAsImage(image))
    field = np.exp(log_field).astype(np.float32)
    corrected = (data + offset) / field - offset
    info = {"bias_correction": "n4", "bias_field_min": float(field.min()), "bias_field_max": float(field.max())}
    return corrected.astype(np.float32), info


def smooth_mm(roi, roi_affine, sigma_mm):
    """Gaussian smoothing with a physical ``sigma_mm`` (recursive, anisotropy-aware)."""
    data = np.asarray(roi, np.float32)
    if sigma_mm <= 0:
        return data
    image = sitk.SmoothingRecursiveGaussian(to_sitk(data, roi_affine), float(sigma_mm))
    return from_sitk(image)[0].astype(np.float32)


def prepare_roi(image, affine, box, params):
    """Crop, bias-correct and smooth a box of an image.

    Parameters
    ----------
    image : (I, J, K) ndarray
    affine : (4, 4) ndarray
    box : tuple of slice
    params : SegmentationParams

    Returns
    -------
    smoothed : ndarray of float32
    info : dict
    """
    roi_affine = crop_affine(affine, box)
    roi = np.asarray(image[box], np.float32)
    info = {"roi_shape": [int(n) for n in roi.shape]}
    if params.bias_correction:
        roi, bias_info = correct_bias(roi, roi_affine, params)
        info.update(bias_info)
    else:
        info["bias_correction"] = "off"
    return smooth_mm(roi, roi_affine, params.smoothing_sigma_mm), info


def robust_sd(values):
    """1.4826 x median absolute deviation (the SD for Gaussian data)."""
    values = np.asarray(values, float)
    if values.size == 0:
        return 0.0
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def tissue_level(values, bins=256):
    """Level and spread of the commonest ordinary tissue (muscle in a trunk, brain in a head).

    A three-class Otsu split separates the dark class (air, background,
    suppressed fat) from the rest; the level is the mode of a smoothed
    histogram of what lies above it. Unlike a median, the mode does not
    move when a large lesion takes a bigger share of the region, so it can
    anchor intensities, also across sessions.

    Parameters
    ----------
    values : ndarray
    bins : int

    Returns
    -------
    level : float
    dark : float
        Values below this are dark background.
    sd : float
        Spread of that tissue (from the full width at half maximum of its
        histogram peak, as a Gaussian standard deviation).
    """
    values = np.asarray(values, np.float32).ravel()
    if values.size > 2_000_000:  # a regular subsample is plenty for a histogram
        values = values[:: values.size // 1_000_000]
    try:
        dark = float(threshold_multiotsu(values, classes=3)[0])
    except ValueError:  # fewer than three distinct values
        dark = float(values.min())
    tissue = values[values > dark]
    if tissue.size < 10:
        return float(np.median(values)), dark, robust_sd(values)
    lo, hi = np.percentile(tissue, [0.5, 99.5])
    hist, edges = np.histogram(tissue, bins=bins, range=(lo, hi if hi > lo else lo + 1))
    hist = ndimage.gaussian_filter1d(hist.astype(float), 2.0)
    k = int(np.argmax(hist))
    centres = 0.5 * (edges[:-1] + edges[1:])
    # Spread from the peak's full width at half maximum (Gaussian: 2.355 sd).
    below_half = hist < 0.5 * hist[k]
    left = np.flatnonzero(below_half[:k])
    right = np.flatnonzero(below_half[k:])
    lo_edge = centres[left[-1]] if left.size else centres[0]
    hi_edge = centres[k + right[0]] if right.size else centres[-1]
    return float(centres[k]), dark, float(hi_edge - lo_edge) / 2.355


def initial_model(roi, sample):
    """First guess of the intensity model from the region and a seed sample.

    Parameters
    ----------
    roi : ndarray
        Region intensities.
    sample : ndarray
        Intensities within ``seed_search_radius_mm`` of the seed.

    Returns
    -------
    model : IntensityModel
    tissue_sd : float
        Robust standard deviation of ordinary tissue.

    Notes
    -----
    The surrounding level starts as the commonest ordinary tissue
    (:func:`tissue_level`). The lesion level is the median of the part of
    the sample brighter than half-way between that and the sample's 90th
    percentile, so a seed on a septum, flow void or necrosis still finds the
    lesion around it.
    """
    level, dark, tissue_sd = tissue_level(roi)
    top = float(np.percentile(sample, 90))
    bright = sample[sample > 0.5 * (level + top)]
    if bright.size == 0:
        bright = np.array([top])
    model = IntensityModel(
        lesion=float(np.median(bright)), surround=level, lesion_sd=robust_sd(bright), dark=dark, floor=level
    )
    return model, tissue_sd


def update_model(model, smoothed, region, spacing_mm, params):
    """Re-estimate lesion and surrounding levels from a segmentation.

    ``L`` and ``sd`` come from the lesion voxels at or above the lower
    threshold (septa and voids excluded), ``sd`` from those at least
    ``shell_inner_mm`` inside it, away from partial volume. ``B`` stays the
    region's ordinary tissue level (``model.floor``, the mode of
    :func:`tissue_level`), not the median of a shell just outside the
    lesion. Why: around an infiltrative lesion that shell is largely the
    lesion's own dimmer margin (oedema, infiltrated tissue); its median
    raised ``B`` and the threshold with it, and the passes shrank the lesion
    from its margin inward (real FLAIR tumours lost up to a third of their
    volume). The tissue the lesion displaces is what it stands out from.
    On bias-corrected phantoms the shell median was at or below that level
    anyway (fat in the shell), so their results barely change.
    """
    lesion = region & (smoothed >= model.lower(params))
    if not lesion.any():
        return model
    values = smoothed[lesion]
    inner = smoothed[lesion & erode_mm(region, spacing_mm, params.shell_inner_mm)]
    return IntensityModel(
        lesion=float(np.median(values)), surround=model.floor,
        lesion_sd=robust_sd(inner if inner.size >= 50 else values),
        dark=model.dark, floor=model.floor,
    )


# --------------------------------------------------------------------------
# Band segmentation


def fluid_plateaus(smoothed, upper, max_sd, min_height_sd):
    """Flat plateaus above ``upper``, like fluid.

    Candidates (above ``upper``) are eroded by one voxel before labelling, so
    partial-volume bridges between a fluid collection and bright lesion
    tissue next to it break and each is judged on its own interior. A part
    is a plateau when its interior is flat (standard deviation at most
    ``max_sd``) and stands clear of the threshold (mean at least
    ``min_height_sd`` standard deviations above it): a patch of smooth lesion
    heterogeneity crossing the threshold has its values spread from the
    threshold up, fluid sits well above it with only noise. Plateaus are
    returned grown back by one voxel within the candidates.

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
    sd = np.sqrt(np.maximum(label_sums(labels, n, interior, np.square(smoothed, dtype=np.float64)) / count - mean**2, 0))
    flat = (count >= 8) & (sd <= max_sd) & (mean - upper >= min_height_sd * sd)
    plateaus = select_labels(labels, flat)
    return ndimage.binary_dilation(plateaus, structure=cube) & candidates


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
    whole = select_labels(labels, touching & (farthest <= params.restore_max_mm))
    part = select_labels(labels, touching) & (dist <= params.restore_radius_mm)
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
        rim = ndimage.binary_dilation(beside, structure=np.ones((3, 3, 3), bool))
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
        fluid = ndimage.binary_dilation(fluid, structure=np.ones((3, 3, 3), bool))
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
    half of the volume's uncertainty band (:mod:`khe_vol.uncertainty`).

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


def refine_edges(smoothed, region, spacing_mm, params):
    """Move the lesion boundary onto the steepest intensity edge.

    A marker watershed of the gradient magnitude decides the one-voxel band
    on each side of the thresholded boundary: the edge sits where the
    intensity changes fastest, which for a partial-volume blurred step is
    half-way, whatever the neighbouring tissue is (muscle, oedema, fat).
    Only axes with fine sampling take part (within 1.5x the finest voxel
    size): across thick slices an edge cannot be placed between voxels, and
    the threshold (half-way between lesion and surroundings) decides there.

    Parameters
    ----------
    smoothed : ndarray
    region : ndarray of bool
    spacing_mm : (3,) ndarray
    params : SegmentationParams

    Returns
    -------
    ndarray of bool
    """
    if params.edge_sigma_mm <= 0 or not region.any():
        return region
    spacing = np.asarray(spacing_mm, float)
    fine = spacing <= 1.5 * spacing.min()
    box = mask_box(region, spacing, 4 * params.edge_sigma_mm + 2 * float(spacing[fine].max()))
    sub = region[box]
    values = smoothed[box].astype(np.float32)
    # Gradient magnitude along the fine axes only, in intensity per mm.
    squared = np.zeros(values.shape, np.float32)
    for axis in np.flatnonzero(fine):
        sigma = np.zeros(3)
        sigma[axis] = params.edge_sigma_mm / spacing[axis]
        order = [0, 0, 0]
        order[axis] = 1
        squared += (ndimage.gaussian_filter(values, sigma, order=order) / spacing[axis]) ** 2
    # One voxel in every direction along the fine axes (3x3x3 or 3x3x1).
    step = np.pad(np.ones([3 if f else 1 for f in fine], bool), [(0, 0) if f else (1, 1) for f in fine])
    markers = np.zeros(sub.shape, np.int32)
    markers[ndimage.binary_erosion(sub, step, border_value=1)] = 1
    markers[~ndimage.binary_dilation(sub, step)] = 2
    refined = watershed(np.sqrt(squared), markers) == 1
    out = np.zeros_like(region)
    out[box] = refined
    return fill_lesion_holes(components_touching(out, region & out), spacing, params)


# --------------------------------------------------------------------------
# Public entry point


def segment_from_seed(image, affine, seed_ras_mm, params=SegmentationParams()):
    """Segment the hyperintense lesion containing (or right next to) a seed point.

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
    result = _segment_in_box(image, affine, box, ijk, seed_ras_mm, spacing, params)
    recentred, note = 0, None
    while recentred < params.recentre_passes:
        moved = roi_box(lesion_box_centre(result[1], box), image.shape, spacing, params)
        if moved == box or not _contains(moved, ijk):
            break
        try:
            result = _segment_in_box(image, affine, moved, ijk, seed_ras_mm, spacing, params)
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
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    info["threshold_band_ml"] = threshold_band_ml(smoothed, model, region, spacing, params, voxel_ml, core)
    mask = np.zeros(image.shape, np.uint8)
    mask[box] = region
    info.update(model.as_dict(params))
    info["threshold_history"] = history
    info.update(_summary(mask, affine, region, box, image.shape))
    info["seconds"] = round(time.process_time() - started, 3)
    return mask, info


def roi_box(center_ijk, shape, spacing_mm, params):
    """Region of interest around a voxel: :func:`crop_box` of ``max_radius_mm``,
    spanning the whole image along axes at most ``whole_axis_mm`` long.

    Returns
    -------
    tuple of slice
    """
    box = crop_box(center_ijk, shape, spacing_mm, params.max_radius_mm)
    return tuple(slice(0, int(n)) if n * s <= params.whole_axis_mm else b
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
    idx = np.argwhere(region)
    mid = (idx.min(axis=0) + idx.max(axis=0)) // 2
    return tuple(int(m + sl.start) for m, sl in zip(mid, box))


def _segment_in_box(image, affine, box, ijk, seed_ras_mm, spacing, params):
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
    smoothed, info = prepare_roi(image, affine, box, params)
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
    margin = np.ceil((params.shell_outer_mm + params.opening_radius_mm + 10.0) / np.asarray(spacing, float))
    if any(sl.start > 0 or sl.stop < n for sl, n in zip(search, smoothed.shape)):
        start = tuple(i - sl.start for i, sl in zip(seed_roi, search))
        sub, sub_model, history = iterate_segmentation(
            smoothed[search], model, start, spacing, params, params.seed_search_radius_mm
        )
        if sub.any():
            idx = np.argwhere(sub)
            lo, hi = idx.min(axis=0), idx.max(axis=0)
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
