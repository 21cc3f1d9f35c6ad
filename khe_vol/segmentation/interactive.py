"""Interactive segmentation: a reader's include and exclude clicks steer the lesion mask.

Clicks are points in scanner RAS+ mm, applied in order to a starting mask:
the automatic segmentation from the first include click (the seed,
:func:`khe_vol.segmentation.seeded.segment_from_seed`), the learned engine's
mask inside a box drawn first (:data:`BOX`,
:func:`khe_vol.segmentation.learned.segment_box`), or a given mask (a tracked
proposal, an earlier read; an empty one is no mask).

- **Include, outside the mask**: the tissue at the point joins the mask.
  Lesion-bright tissue (at or above the model's lower threshold) joins as
  its connected bright part, fluid and bridges thinner than the opening left
  out, as the seeded segmentation would take it. Dimmer tissue above the
  ordinary tissue level (oedema, infiltration) joins as the connected tissue
  at least as bright as the click (within ``click_level_tolerance`` local
  standard deviations, at least ``click_min_contrast_fraction`` of the
  lesion contrast, and never below half-way from ordinary tissue to the
  click) within reach: ``click_reach_mm`` beyond the lesion edge nearest the
  click. Tissue darker than ordinary tissue (a necrotic, cystic or
  haemorrhagic core the reader says belongs) joins as the connected tissue
  darker than half-way from the click to ordinary tissue, with its
  partial-volume rim, inside the lesion's convex hull (slice by slice), so it
  cannot run off into tissue elsewhere. Holes the new part closes are filled.
- **Include, inside the mask**: marks that part as lesion for later excludes.
- **Exclude, inside the mask**: on tissue dimmer than the lesion threshold
  the mask's tissue no brighter than the click goes within reach of the
  click, and beyond it wherever it is connected to the click outside the
  lesion's bright body, its holes and its partial-volume rim (a halo around
  the whole lesion, slab-end slices); on
  lesion-bright tissue, within reach of the click (``click_reach_mm`` beyond
  its depth in the mask), the mask is partitioned along intensity edges (a
  marker watershed of the gradient magnitude) between the click and the
  mask at the edge of its reach and the include markers, and the click's
  part goes. Parts cut off from every include marker go too. Include markers
  are the include clicks, the seed, and for a start mask the interior-most
  voxel of each of its parts.
- **Exclude, outside the mask**: a barrier: later growth is partitioned
  against it the same way and cannot take it.
- At one voxel, the later click wins.

The same image, clicks, start mask and parameters give the same bytes on any
thread count. :class:`ClickSession` keeps what it prepared for an image (the
region of interest, bias correction, intensity model, gradient) and the mask
after each click, so a further click, or an undo, costs one step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.morphology import convex_hull_image
from skimage.segmentation import watershed

from khe_vol.geometry import from_canonical, seed_voxel, to_canonical, voxel_sizes_mm
from khe_vol.segmentation.band import fluid_mask
from khe_vol.segmentation.intensity import PreparedRoi, initial_model, prepare_roi, robust_sd, update_model
from khe_vol.segmentation.morphology import (
    ball_mask,
    component_near,
    components_touching,
    crop_box,
    fill_lesion_holes,
    fine_axes,
    mask_box,
    opening_mm,
    thickest_axis,
    within_mm,
)
from khe_vol.segmentation.params import SegmentationError, SegmentationParams
from khe_vol.segmentation.seeded import lesion_box_centre, roi_box, seeded_roi

INCLUDE = "include"
EXCLUDE = "exclude"
#: A reader's 3D box, the first interaction only: the learned engine's mask inside it is the start.
BOX = "box"
CLICK_KINDS = (INCLUDE, EXCLUDE, BOX)

#: Most clicks one segmentation takes (a reader's session, not a script).
MAX_CLICKS = 200


@dataclass(frozen=True)
class Click:
    """One reader click.

    Attributes
    ----------
    kind : {"include", "exclude", "box"}
    ras_mm : tuple of float
        The point, scanner RAS+ mm; for a box two opposite corners
        ``x0, y0, z0, x1, y1, z1`` (its extent across the slices is the
        slice range).
    """

    kind: str
    ras_mm: tuple

    def __post_init__(self):
        if self.kind not in CLICK_KINDS:
            raise ValueError(f"a click is 'include', 'exclude' or 'box', not {self.kind!r}")
        what = "a box is six finite numbers (two corners, RAS+ mm)" if self.kind == BOX else \
            "a click point is three finite numbers (RAS+ mm)"
        try:
            point = tuple(float(v) for v in self.ras_mm)
        except (TypeError, ValueError):
            raise ValueError(f"{what}, not {self.ras_mm!r}") from None
        if len(point) != (6 if self.kind == BOX else 3) or not all(math.isfinite(v) for v in point):
            raise ValueError(f"{what}, not {self.ras_mm!r}")
        object.__setattr__(self, "ras_mm", point)

    def as_dict(self):
        return {"kind": self.kind, "ras_mm": list(self.ras_mm)}


def clicks_from_json(items):
    """Clicks from a JSON list of ``{"kind": ..., "ras_mm": [x, y, z]}`` (hostile input).

    Raises
    ------
    ValueError
        Not such a list, or longer than :data:`MAX_CLICKS`.
    """
    if not isinstance(items, list):
        raise ValueError("clicks must be a list of {kind, ras_mm}")
    if len(items) > MAX_CLICKS:
        raise ValueError(f"at most {MAX_CLICKS} clicks, got {len(items)}")
    clicks = []
    for item in items:
        if not isinstance(item, dict) or set(item) != {"kind", "ras_mm"}:
            raise ValueError("each click is an object with exactly 'kind' and 'ras_mm'")
        if not isinstance(item["ras_mm"], list) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                       for v in item["ras_mm"]):
            raise ValueError("a click's ras_mm is a list of numbers (three; six for a box)")
        if not isinstance(item["kind"], str):
            raise ValueError("a click's kind is 'include', 'exclude' or 'box'")
        clicks.append(Click(item["kind"], tuple(item["ras_mm"])))
    if any(c.kind == BOX for c in clicks[1:]):
        raise ValueError("a box can only be the first interaction (draw it again to start over)")
    return clicks


def roi_from_mask(image, affine, start_mask, params=SegmentationParams()):
    """Prepare the region of interest around a given lesion mask.

    The box is the seeded box centred on the mask (:func:`roi_box`) grown to
    hold the whole mask with a margin; the intensity model is re-estimated
    from the mask (:func:`update_model`).

    Parameters
    ----------
    image : (I, J, K) ndarray
    affine : (4, 4) ndarray
    start_mask : (I, J, K) ndarray of bool
        Not empty.
    params : SegmentationParams

    Returns
    -------
    PreparedRoi
    """
    spacing = voxel_sizes_mm(affine)
    centred = roi_box(lesion_box_centre(start_mask, tuple(slice(0, n) for n in start_mask.shape)),
                      image.shape, spacing, params)
    held = mask_box(start_mask, spacing, params.shell_outer_mm + params.opening_radius_mm + 10.0)
    box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(centred, held))
    smoothed, _ = prepare_roi(image, affine, box, params)
    region = start_mask[box]
    model, _ = initial_model(smoothed, smoothed[region])
    model = update_model(model, smoothed, region, spacing, params)
    return PreparedRoi(box=box, smoothed=smoothed, model=model, spacing_mm=spacing)


def interior_markers(region, spacing_mm):
    """The interior-most voxel (largest distance to its border, mm) of each part of a mask.

    Among equally deep voxels of a part, the first in C order. Computed on the
    mask's bounding box, one voxel wider within the array (so the distances are
    those of the whole array), and per part on its own box: a large region of
    interest costs no more than the mask.

    Returns
    -------
    list of tuple of int
        One per part, in label order (:func:`scipy.ndimage.label`).
    """
    region = np.asarray(region, bool)
    labels, n = ndimage.label(region)
    if n == 0:
        return []
    # One voxel wider where the array goes on (background there); the array's own edge is no border.
    box = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n_ax))
                for b, n_ax in zip(ndimage.find_objects(region.astype(np.uint8))[0], region.shape))
    depth = ndimage.distance_transform_edt(region[box], sampling=spacing_mm)
    labels = labels[box]
    points = []
    for i, part in enumerate(ndimage.find_objects(labels), start=1):
        inside = np.where(labels[part] == i, depth[part], -1.0)
        at = np.unravel_index(int(np.argmax(inside)), inside.shape)
        points.append(tuple(int(b.start + p.start + a) for b, p, a in zip(box, part, at)))
    return points


def gradient_magnitude(smoothed, spacing_mm, params):
    """Gradient magnitude at ``edge_sigma_mm`` (image units per voxel; only its order matters)."""
    sigma = [params.edge_sigma_mm / s for s in spacing_mm]
    return ndimage.gaussian_gradient_magnitude(np.asarray(smoothed, np.float32), sigma).astype(np.float32)


def split_by_markers(gradient, region, include_ijk, exclude_ijk, compactness=0.0):
    """Partition a mask between include and exclude markers along intensity edges.

    Parameters
    ----------
    gradient : ndarray
        Gradient magnitude on the region's grid.
    region : ndarray of bool
    include_ijk, exclude_ijk : list of tuple of int
        Marker voxels; those outside ``region`` are ignored.
    compactness : float
        Compact watershed: each voxel of distance from a marker costs this
        many times the region's median gradient, so a flat region (fluid,
        homogeneous tissue) is shared by distance instead of by its noise.

    Returns
    -------
    ndarray of bool
        The voxels of ``region`` that do not belong to an exclude marker
        (parts reached by no marker stay).
    """
    exclude_ijk = [p for p in exclude_ijk if region[p]]
    if not exclude_ijk:
        return region.copy()
    box = mask_box(region, (1.0, 1.0, 1.0), 0)
    offset = np.array([s.start for s in box])
    markers = np.zeros(region[box].shape, np.int32)
    for p in include_ijk:
        if region[p]:
            markers[tuple(np.asarray(p) - offset)] = 1
    for p in exclude_ijk:  # an exclude on an include marker wins: it came later
        markers[tuple(np.asarray(p) - offset)] = 2
    relief = gradient[box]
    typical = float(np.median(relief[region[box]]))
    if typical > 0:  # scale-free: the same compactness for any intensity scale
        relief = relief / typical
    labels = watershed(relief, markers, mask=region[box], compactness=compactness)
    out = region.copy()
    out[box] &= labels != 2
    return out


def _slicewise_hull(mask, axis):
    """Convex hull of a mask in every slice along ``axis`` (empty slices stay empty)."""
    hull = np.zeros_like(mask)
    moved_in, moved_out = np.moveaxis(mask, axis, 0), np.moveaxis(hull, axis, 0)
    for k in np.flatnonzero(moved_in.any(axis=(1, 2))):
        moved_out[k] = convex_hull_image(moved_in[k])
    return hull


def click_level(smoothed, point_ijk, spacing_mm, params):
    """The level of the tissue a reader clicked: the median within ``click_sample_radius_mm``
    (a reader points at tissue, not at one voxel's noise)."""
    box = crop_box(point_ijk, smoothed.shape, spacing_mm, params.click_sample_radius_mm)
    local = tuple(int(p - s.start) for p, s in zip(point_ijk, box))
    near = ball_mask(smoothed[box].shape, local, spacing_mm, params.click_sample_radius_mm)
    return float(np.median(smoothed[box][near]))


def _tolerance(values, local, spacing_mm, model, params):
    """Intensity tolerance around a click's level: local noise, or a share of the lesion contrast."""
    near = ball_mask(values.shape, local, spacing_mm, params.click_sample_radius_mm)
    return max(params.click_level_tolerance * robust_sd(values[near]),
               params.click_min_contrast_fraction * model.contrast)


def distance_to_mm(mask, point_ijk, spacing_mm, cap_mm):
    """Distance from a voxel centre to the nearest voxel of ``mask``, mm, looked for up to ``cap_mm``.

    Returns
    -------
    float
        ``cap_mm`` when no voxel of ``mask`` is that close.
    """
    box = crop_box(point_ijk, mask.shape, spacing_mm, cap_mm)
    idx = np.argwhere(mask[box])
    if idx.size == 0:
        return float(cap_mm)
    offset = np.array([s.start for s in box]) - np.asarray(point_ijk)
    return min(float(cap_mm), float(np.sqrt((((idx + offset) * spacing_mm) ** 2).sum(axis=1)).min()))


def _keep_marked(region, include_ijk):
    """The parts of ``region`` holding an include marker (all of it when none is left in it)."""
    markers = np.zeros(region.shape, bool)
    for p in include_ijk:
        markers[p] = True
    return components_touching(region, markers) if (markers & region).any() else region


def _click_reach_mm(distance_mm, params):
    """How far a click acts: ``click_reach_mm`` beyond the lesion edge nearest it."""
    return min(params.click_reach_mm + distance_mm, params.max_radius_mm)


def _with_rim(body, spacing_mm):
    """``body`` and its one-voxel rim along the finely sampled axes: its partial volume in plane
    (across thick slices a neighbouring slice is tissue of its own, such as a slab end)."""
    structure = np.zeros((3, 3, 3), bool)
    structure[tuple(slice(None) if fine else slice(1, 2) for fine in fine_axes(spacing_mm))] = True
    return ndimage.binary_dilation(body, structure=structure)


def shrink_at_click(roi, region, point_ijk, include_ijk, gradient, params):
    """The mask after a reader's exclude click at ``point_ijk``, inside it (see the module notes).

    On tissue dimmer than the lesion threshold, the mask's tissue no brighter
    than the click (within the tolerance) goes: within reach of the click
    (``click_reach_mm`` beyond its depth in the mask), and beyond it
    wherever it is connected to the click outside the lesion's bright body
    (its holes and its in-plane partial-volume rim kept): a halo around the
    whole lesion, a slab-end slice. On lesion-bright tissue, within reach of
    the click, the mask is partitioned along intensity edges
    (:func:`split_by_markers`) between the click and the mask at the edge of
    the reach (and the include markers), and the click's part goes. Parts of
    the mask this cuts off from every include marker go too.
    """
    smoothed, model, spacing = roi.smoothed, roi.model, roi.spacing_mm
    level = click_level(smoothed, point_ijk, spacing, params)
    reach_mm = _click_reach_mm(distance_to_mm(~region, point_ijk, spacing, params.max_radius_mm), params)
    sub = crop_box(point_ijk, smoothed.shape, spacing, reach_mm)
    local = tuple(int(p - s.start) for p, s in zip(point_ijk, sub))
    values, inside = smoothed[sub], region[sub]
    reach = ball_mask(values.shape, local, spacing, reach_mm)
    if level < model.lower(params):
        ceiling = level + _tolerance(values, local, spacing, model, params)
        gone = np.zeros(region.shape, bool)
        gone[sub] = component_near(inside & reach & (values <= ceiling), local, spacing, 0.0)
        # Beyond the reach, the same dim tissue outside the lesion's bright body (its holes and
        # its partial-volume rim kept) goes wherever it is connected: an oedema halo around the
        # whole lesion, the slab-end slices.
        body = _with_rim(fill_lesion_holes(region & (smoothed >= model.lower(params)), spacing, params), spacing)
        gone = component_near(gone | (region & ~body & (smoothed <= ceiling)), point_ijk, spacing, 0.0)
        gone[point_ijk] = True
        return _keep_marked(region & ~gone, include_ijk)
    # Lesion-bright: partition the mask near the click along intensity edges.
    near = inside & reach
    rim = near & ~ndimage.binary_erosion(reach)  # the outer voxel layer of the reach
    offset = np.array([s.start for s in sub])
    keep = [tuple(np.asarray(p) - offset) for p in include_ijk
            if all(s.start <= i < s.stop for s, i in zip(sub, p))]
    keep += [tuple(int(v) for v in q) for q in np.argwhere(rim)]
    gone = near & ~split_by_markers(gradient[sub], near, keep, [local], params.click_compactness)
    gone[local] = True
    out = region.copy()
    out[sub] &= ~gone
    return _keep_marked(out, include_ijk)


def lesion_hull(region, spacing_mm):
    """Where a lesion's core may lie: the slice-wise convex hull of ``region`` across its
    thickest axis, or on a near-isotropic grid (thickest voxel edge < 1.5 x the finest)
    the union of those across all three axes."""
    spacing_mm = np.asarray(spacing_mm, float)
    if spacing_mm.max() >= 1.5 * spacing_mm.min():
        return _slicewise_hull(region, thickest_axis(spacing_mm))
    box = mask_box(region, spacing_mm, 0.0)
    hull = np.zeros_like(region)
    for axis in range(3):
        hull[box] |= _slicewise_hull(region[box], axis)
    return hull


def grow_from_click(roi, region, point_ijk, params):
    """The tissue a reader's include click at ``point_ijk`` adds (see the module notes).

    Lesion-bright tissue: its connected bright part, fluid and bridges
    thinner than the opening left out.
    Dimmer tissue above the ordinary tissue level: the connected tissue at
    least as bright as the click (within the tolerance, and at least
    half-way from ordinary tissue to the click's level), within reach
    (``click_reach_mm`` beyond the lesion edge nearest the click). Darker
    than ordinary tissue (a necrotic or cystic core): the connected tissue
    darker than half-way between the click and ordinary tissue, and its
    partial-volume rim, within the lesion's hull (:func:`lesion_hull`).

    Parameters
    ----------
    roi : PreparedRoi
    region : ndarray of bool
        The current mask on the region's grid.
    point_ijk : tuple of int
        On the region's grid, outside ``region``.
    params : SegmentationParams

    Returns
    -------
    ndarray of bool
        On the region's grid; contains ``point_ijk``.
    """
    smoothed, model, spacing = roi.smoothed, roi.model, roi.spacing_mm
    level = click_level(smoothed, point_ijk, spacing, params)
    if level < model.floor:  # darker than ordinary tissue: a core, inside the lesion's hull
        sub = crop_box(point_ijk, smoothed.shape, spacing, params.max_radius_mm)
        local = tuple(int(p - s.start) for p, s in zip(point_ijk, sub))
        values = smoothed[sub]
        hull = lesion_hull(region[sub] | ball_mask(values.shape, local, spacing, 2.0 * max(spacing)), spacing)
        # Darker than half-way from here to ordinary tissue, with its one-voxel
        # partial-volume rim below the lesion threshold.
        part = component_near(hull & (values < 0.5 * (level + model.floor)), local, spacing, 0.0)
        part |= ndimage.binary_dilation(part) & hull & (values < model.lower(params))
    else:
        sub = crop_box(point_ijk, smoothed.shape, spacing, params.max_radius_mm)
        local = tuple(int(p - s.start) for p, s in zip(point_ijk, sub))
        values = smoothed[sub]
        part = np.zeros(values.shape, bool)
        if level >= model.lower(params):  # lesion-bright: its bright part, bridges and fluid cut, as from a seed
            bright = values >= model.lower(params)
            fluid = fluid_mask(values, model, params)
            if not fluid[local]:  # unless the reader clicked the fluid itself
                bright &= ~fluid
            part = component_near(opening_mm(bright, spacing, params.opening_radius_mm), local, spacing,
                                  params.seed_search_radius_mm)
            if not part[local]:  # thinner than the opening there: the bright part at the point alone
                part = component_near(bright, local, spacing, 0.0)
        # Nearby, dimmer tissue too (oedema, infiltration): as bright as the click
        # (or the lesion threshold), within the tolerance, but never down to
        # ordinary tissue: at least half-way from it to that level.
        level_here = min(level, model.lower(params))
        lowest = max(level_here - _tolerance(values, local, spacing, model, params), 0.5 * (level_here + model.floor))
        reach_mm = _click_reach_mm(distance_to_mm(region, point_ijk, spacing, params.max_radius_mm), params)
        reach = ball_mask(values.shape, local, spacing, reach_mm)
        part |= component_near(reach & (values >= lowest), local, spacing, 0.0)
    part[local] = True
    out = np.zeros(smoothed.shape, bool)
    out[sub] = part
    return out


class ClickSession:
    """Reader clicks on one image: prepared once, each click one step.

    Parameters
    ----------
    image : (I, J, K) array_like
    affine : (4, 4) array_like
        Voxel-to-world RAS+ affine, mm.
    start_mask : (I, J, K) array_like, optional
        Starting mask (non-zero = lesion). Without it, or when it is empty
        (a 0 mL proposal), the first click must be an include: the seed.
    params : SegmentationParams
    volume_band : bool
        Compute the seeded segmentation's volume band (``info["seeded"]``);
        a reader's clicks do without it (two segmentations less per seed).

    Notes
    -----
    :meth:`segment` keeps the mask after every click of the last click list,
    so a list that extends it (a new click) or shortens it (undo) reuses
    that work. Results do not depend on what was asked before.
    """

    def __init__(self, image, affine, start_mask=None, params=SegmentationParams(), volume_band=True):
        image = np.asarray(image)
        if image.ndim != 3:
            raise SegmentationError(f"expected a 3D image, got an array of shape {image.shape}")
        self.shape = image.shape
        # Everything is computed on the canonical array order (the result does not depend on the
        # order a file used) and handed back in the caller's.
        self.image, self.affine, self._ornt = to_canonical(image, affine)
        self.params = params
        self.spacing_mm = voxel_sizes_mm(self.affine)
        self.start_mask = None
        if start_mask is not None:
            start_mask = np.asarray(start_mask) != 0
            if start_mask.shape != self.shape:
                raise SegmentationError(f"the start mask (shape {list(start_mask.shape)}) is not on the image "
                                        f"grid (shape {list(self.shape)})")
            start_mask = to_canonical(start_mask, affine)[0]
            # An empty start mask (a 0 mL proposal) is no mask: the first include click seeds.
            self.start_mask = start_mask if start_mask.any() else None
        self.volume_band = volume_band
        self._prepared = {}  # box -> prepare_roi's result: N4 runs once per box
        self._roi = None  # the region the clicks work on now: the seed's, the box's or the start mask's
        self._mask_roi = None  # the start mask's
        self._mask_markers = None  # and its parts' interior-most voxels
        self._gradient = None
        self._seed = None  # (seed click, region, info, roi) of the last seed
        self._box = None  # (box click, region, info, roi, include markers) of the last box
        self._encoder = None  # the learned engine's slice embeddings, kept for the next box
        self._steps = []  # (click, (region, include markers, exclude markers)) after each click
        self._steps_start = None  # what those steps started from

    def _prepare_roi(self, image, affine, box, params):
        """:func:`prepare_roi`, once per box."""
        key = tuple((s.start, s.stop) for s in box)
        if key not in self._prepared:
            self._prepared[key] = prepare_roi(image, affine, box, params)
        return self._prepared[key]

    def prepare(self):
        """Do before the first click what does not depend on it.

        With a start mask, its region of interest and its parts' interior
        markers. Without, the bias
        correction of the whole image when the seeded box spans it whatever
        the seed (every axis at most ``whole_axis_mm`` long), as for most
        series; otherwise nothing.
        """
        if self.start_mask is not None:
            # All the first click needs of the start mask: its region and its parts' markers.
            if self._mask_roi is None:
                self._mask_roi = roi_from_mask(self.image, self.affine, self.start_mask, self.params)
            if self._mask_markers is None:
                self._mask_markers = interior_markers(self.start_mask[self._mask_roi.box], self.spacing_mm)
            return
        extents_mm = np.asarray(self.image.shape) * self.spacing_mm
        if np.all(extents_mm <= within_mm(self.params.whole_axis_mm)):
            self._prepare_roi(self.image, self.affine, tuple(slice(0, int(n)) for n in self.image.shape), self.params)

    def _voxel(self, click):
        ijk = seed_voxel(click.ras_mm, self.affine, self.image.shape)
        if ijk is None:
            x, y, z = click.ras_mm
            raise SegmentationError(f"{click.kind} click ({x:.1f}, {y:.1f}, {z:.1f}) RAS+ mm lies outside the image")
        box = self._roi.box
        if not all(s.start <= i < s.stop for s, i in zip(box, ijk)):
            x, y, z = click.ras_mm
            raise SegmentationError(
                f"{click.kind} click ({x:.1f}, {y:.1f}, {z:.1f}) RAS+ mm lies outside the region prepared "
                f"around the lesion (more than {self.params.max_radius_mm:g} mm from it)")
        return tuple(int(i - s.start) for i, s in zip(ijk, box))

    def _start_from_box(self, box_click):
        """Region, markers and info of a box: the learned engine's mask inside it."""
        from khe_vol.segmentation.learned import SliceEncoder, segment_box, slice_axis

        if self._box is None or self._box[0] != box_click:
            if self._encoder is None:
                self._encoder = SliceEncoder(self.image, slice_axis(self.spacing_mm))
            mask, info = segment_box(self.image, self.affine, box_click.ras_mm, encoder=self._encoder)
            if not mask.any():
                raise SegmentationError("the learned engine found no lesion in the box; draw it around the lesion, "
                                        "or start from an include click")
            roi = roi_from_mask(self.image, self.affine, mask != 0, self.params)
            region = mask[roi.box] != 0
            self._box = (box_click, region, info, roi, interior_markers(region, self.spacing_mm))
        _, region, info, roi, markers = self._box
        self._use_roi(roi)
        return region, markers, [], {"start": "box", "box": info}

    def _start(self, first_click):
        """Region, markers and info before the clicks (the seeded mask uses the first click)."""
        if first_click is not None and first_click.kind == BOX:
            return self._start_from_box(first_click)
        if self.start_mask is None:
            if first_click is None or first_click.kind != INCLUDE:
                raise SegmentationError("with no start mask, the first click must be an include click in the lesion "
                                        "(or a box around it)")
            if self._seed is None or self._seed[0] != first_click:
                mask, info, roi = seeded_roi(self.image, self.affine, first_click.ras_mm, self.params,
                                             prepare=self._prepare_roi, volume_band=self.volume_band)
                self._seed = (first_click, mask[roi.box].astype(bool), info, roi)
            _, region, info, roi = self._seed
            self._use_roi(roi)
            return region, [self._voxel(first_click)], [], {"start": "seed", "seeded": info}
        if self._mask_roi is None:
            self._mask_roi = roi_from_mask(self.image, self.affine, self.start_mask, self.params)
        self._use_roi(self._mask_roi)
        region = self.start_mask[self._roi.box]
        if self._mask_markers is None:
            self._mask_markers = interior_markers(region, self.spacing_mm)
        return region, self._mask_markers, [], {"start": "mask"}

    def _use_roi(self, roi):
        """Work on ``roi`` from here (its gradient is computed again when needed)."""
        if self._roi is not roi:
            self._roi, self._gradient = roi, None

    def _step(self, state, click):
        region, include, exclude = state
        p = self._voxel(click)
        params = self.params
        if click.kind == INCLUDE:
            include = [*include, p]
            if not region[p]:
                part = grow_from_click(self._roi, region, p, params)
                barrier = [q for q in exclude if part[q] and q != p]  # the later click wins at its voxel
                if barrier:  # growth may not take an excluded point: split the part between them
                    part = split_by_markers(self.gradient(), part, [p], barrier, params.click_compactness)
                grown = region | part
                filled = fill_lesion_holes(grown, self.spacing_mm, params)
                holes = filled & ~grown
                if holes.any() and exclude:  # a hole the reader excluded stays out
                    holes = split_by_markers(self.gradient(), holes, [], exclude, params.click_compactness)
                region = grown | holes
        else:
            exclude = [*exclude, p]
            if region[p]:
                region = shrink_at_click(self._roi, region, p, include, self.gradient(), params)
        return region, include, exclude

    def gradient(self):
        if self._gradient is None:
            self._gradient = gradient_magnitude(self._roi.smoothed, self.spacing_mm, self.params)
        return self._gradient

    def segment(self, clicks):
        """The mask after a list of clicks.

        Parameters
        ----------
        clicks : sequence of Click

        Returns
        -------
        mask : ndarray of uint8, shape of the image
            1 = lesion, in the image's own array order.
        info : dict
            JSON-serialisable: ``start`` ("seed" or "mask"), ``n_clicks``,
            ``volume_ml``, ``n_voxels``, ``seconds`` (CPU of this call), and
            for a seeded start the seeded segmentation's info.

        Raises
        ------
        SegmentationError
            No start mask and no include click first; a click outside the
            image or the prepared region; no lesion at the seed.
        """
        started = time.process_time()
        clicks = list(clicks)
        if len(clicks) > MAX_CLICKS:
            raise SegmentationError(f"at most {MAX_CLICKS} clicks, got {len(clicks)}")
        first = clicks[0] if clicks else None
        region, include, exclude, start_info = self._start(first)
        todo = clicks[1:] if start_info["start"] in ("seed", "box") else clicks
        start = first if start_info["start"] in ("seed", "box") else None
        if start != self._steps_start:  # another seed or box: nothing done after the old one applies
            self._steps, self._steps_start = [], start
        kept = 0
        while kept < min(len(todo), len(self._steps)) and self._steps[kept][0] == todo[kept]:
            kept += 1
        steps = self._steps[:kept]
        state = (region, include, exclude) if not steps else steps[-1][1]
        for click in todo[kept:]:
            state = self._step(state, click)
            steps.append((click, state))
        self._steps = steps
        region = state[0]
        mask = np.zeros(self.image.shape, np.uint8)
        mask[self._roi.box] = region
        mask = from_canonical(mask, self._ornt)
        n = int(np.count_nonzero(mask))
        info = {
            "start": start_info["start"],
            "n_clicks": len(clicks),
            "n_voxels": n,
            "volume_ml": float(n * abs(np.linalg.det(self.affine[:3, :3])) / 1000.0),
            "seconds": round(time.process_time() - started, 3),
        }
        for key in ("seeded", "box"):
            if key in start_info:
                info[key] = start_info[key]
        return mask, info


def segment_clicks(image, affine, clicks, start_mask=None, params=SegmentationParams()):
    """Segment a lesion from a reader's include and exclude clicks (see the module notes).

    Parameters
    ----------
    image : (I, J, K) array_like
    affine : (4, 4) array_like
        Voxel-to-world RAS+ affine, mm.
    clicks : sequence of Click
        Applied in order; without ``start_mask`` the first is an include: the seed.
    start_mask : (I, J, K) array_like, optional
    params : SegmentationParams

    Returns
    -------
    mask : ndarray of uint8
    info : dict
        See :meth:`ClickSession.segment`.
    """
    return ClickSession(image, affine, start_mask, params).segment(clicks)
