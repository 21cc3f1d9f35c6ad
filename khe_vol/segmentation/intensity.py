"""Intensities of a region of interest: N4 bias correction, mm smoothing, the ordinary
tissue level and the lesion intensity model (:class:`IntensityModel`), its first
estimate and its re-estimation from a segmentation."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
import SimpleITK as sitk
from skimage.filters import threshold_multiotsu

from khe_vol.geometry import from_sitk, shrink_by_index, to_sitk, voxel_sizes_mm
from khe_vol.segmentation.morphology import crop_affine, erode_mm


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


@dataclass(frozen=True)
class PreparedRoi:
    """A region of interest ready for segmentation.

    Attributes
    ----------
    box : tuple of slice
        Where it lies in the full image.
    smoothed : ndarray of float32
        Bias-corrected, smoothed intensities of ``image[box]``.
    model : IntensityModel
    spacing_mm : (3,) ndarray
        Voxel sizes, mm.
    """

    box: tuple
    smoothed: np.ndarray
    model: IntensityModel
    spacing_mm: np.ndarray


@contextlib.contextmanager
def itk_threads(n):
    """Run SimpleITK filters created inside with ``n`` threads by default, then restore."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def n4_shrink_factors(shape, spacing_mm, params):
    """Whole factors by which each axis is shrunk for the N4 fit.

    To voxels of about ``n4_spacing_mm``, or finer where an axis would then
    have fewer than ``n4_min_samples`` of them. Why: N4's B-spline mesh is
    laid over the field of view, so a small one gets as many spans as a
    large one; with a handful of samples per span the fit followed the noise
    (on 77 mm fields of view, fields off by a third and volumes doubled).

    Parameters
    ----------
    shape : (3,) int
    spacing_mm : (3,) float
        Voxel sizes, mm.
    params : SegmentationParams

    Returns
    -------
    tuple of int
    """
    factors = []
    for n, s in zip(shape, spacing_mm):
        target_mm = min(float(params.n4_spacing_mm), int(n) * float(s) / float(params.n4_min_samples))
        factors.append(max(1, int(round(target_mm / float(s)))))
    return tuple(factors)


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

    Notes
    -----
    N4 fits a smooth field, so it runs on a copy shrunk to about
    ``n4_spacing_mm`` (:func:`n4_shrink_factors`), one voxel per block picked
    by index (:func:`khe_vol.geometry.shrink_by_index`). Why by index:
    SimpleITK's ``Shrink`` picks by rounding a physical position, so a change
    of the header far below a voxel picked other voxels of a noisy image and
    moved the field by up to 30 % on a small field of view. Why one voxel, not
    a block mean: a mean mixes fat, lesion and fluid into the tissue the field
    is fitted on (on phantoms a residual field error of 2-3.5 %, against
    0.7-1.3 % from single voxels).
    """
    data = np.asarray(roi, np.float32)
    if float(data.min()) < 0:
        return data, {"bias_correction": "skipped: negative intensities (already normalised)"}
    # N4 works on log intensities: keep zeros (air) off the log by a tiny offset.
    offset = np.float32(1e-3 * float(data.max() or 1.0))
    shifted = data + offset
    factors = n4_shrink_factors(data.shape, voxel_sizes_mm(roi_affine), params)
    values, small_affine = shrink_by_index(shifted, roi_affine, factors)
    small = to_sitk(values, small_affine)
    # Fit on ordinary tissue only, the middle class of a three-class Otsu
    # split: without air (no signal to correct) and without the lesion and
    # fluid, whose brightness N4 would otherwise partly take for bias.
    dark, bright = (float(t) for t in threshold_multiotsu(values.ravel(), classes=3))
    mask = to_sitk(((values > dark) & (values <= bright)).astype(np.uint8), small_affine)
    # N4's B-spline fit sums over threads in a thread-count-dependent order,
    # and its inner filters take the global default: one thread makes the
    # field (and every threshold after it) the same on any machine.
    with itk_threads(1):
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations([int(params.n4_iterations)] * int(params.n4_levels))
        corrector.Execute(small, mask)
        log_field, _ = from_sitk(corrector.GetLogBiasFieldAsImage(to_sitk(shifted, roi_affine)))
    field = np.exp(log_field).astype(np.float32)
    corrected = shifted / field - offset
    info = {"bias_correction": "n4", "bias_field_min": float(field.min()), "bias_field_max": float(field.max())}
    return corrected.astype(np.float32), info


def _histogram_sample(values, limit=2_000_000):
    """``values`` flattened, or a regular subsample of them when there are more than ``limit``
    (plenty for a histogram, and the same voxels for the same array)."""
    values = np.asarray(values, np.float32).ravel()
    return values[:: values.size // (limit // 2)] if values.size > limit else values


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


#: How far above the lesion level, in lesion contrasts ``L - B``, a voxel is "much brighter" than the lesion.
BRIGHT_MARGIN_CONTRAST = 0.5


def bright_share(smoothed, region, model):
    """Share of a lesion's voxels much brighter than its own level.

    A lesion's intensities gather around its level ``L``; tissue more than
    :data:`BRIGHT_MARGIN_CONTRAST` contrasts above it in the mask is a second,
    brighter tissue that joined it (fluid of a cyst, an effusion or the
    bladder; a vessel with slow flow), not the lesion's own spread.

    Parameters
    ----------
    smoothed : ndarray
        The prepared region's intensities.
    region : ndarray of bool
        The lesion on ``smoothed``'s grid.
    model : IntensityModel
        The final model of that segmentation.

    Returns
    -------
    float
        In [0, 1]; 0 for an empty region.
    """
    values = smoothed[region]
    if values.size == 0:
        return 0.0
    return float(np.mean(values > model.lesion + BRIGHT_MARGIN_CONTRAST * model.contrast))


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
    values = _histogram_sample(values)
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
