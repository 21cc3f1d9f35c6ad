"""Learned engine: LiteMedSAM box prompts, slice by slice, on ONNX Runtime.

LiteMedSAM (MedSAM distilled to a TinyViT image encoder; Apache-2.0; see
``khe_vol/models/litemedsam/README.md``) segments the object inside a box
drawn on a 2D image. A lesion is segmented slice by slice across the plane
the series was acquired in (its thickest voxel axis; axial on an isotropic
grid), each slice with its own box:

- **A 3D box** (a reader's, ``khe-vol segment --box``): its in-plane
  rectangle on its middle slice, then outwards slice by slice the box of the
  mask found on the slice before, widened by ``carry_pad_mm`` and kept
  inside the 3D box, so a tight box follows the lesion towards its poles.
  The 3D box's slice range is where the lesion may lie. On a pole slice,
  where the lesion is much smaller than its neighbour, the model tends to
  answer with about the neighbour's outline (over-segmentation there).
- **Boxes per slice** (:func:`segment_slice_boxes`): the hybrid engine gives
  the classical mask's box on each of its slices.

Intensities are mapped to 0-255 as the model was trained (clipped to the
series' 0.5th-99.5th percentiles); each slice is shown to the model as a
radiologist views it (anterior or superior up, the patient's right on the
left), resized to 256 pixels on its long side; the decoder's logits are
brought back to the slice's grid and kept above 0. The model files ship inside the
package (no network, no torch at run time); ONNX Runtime runs them on the
CPU with a fixed thread count, so the same input gives the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

import numpy as np

from khe_vol.geometry import from_canonical, to_canonical, voxel_sizes_mm, world_to_voxel
from khe_vol.segmentation.morphology import RADIUS_RTOL, bounding_box
from khe_vol.segmentation.params import SegmentationError

#: Side of the model's square input, pixels.
MODEL_SIZE = 256
MODEL_DIR = "models/litemedsam"
ENCODER_FILE = "litemedsam_encoder.onnx"
DECODER_FILE = "litemedsam_decoder.onnx"
#: SHA-256 of the shipped files: a damaged or replaced model is refused, not run.
MODEL_SHA256 = {
    ENCODER_FILE: "2752622135dab29e4e1d4bd66f85110a66eeba71cabcee3c0cf59ea5c92337a9",
    DECODER_FILE: "5e85bad18046d59932fa79104d23f3bfe66594bcd9f2a7e0594555e8b2c3aebd",
}
#: ONNX Runtime threads: fixed, so results do not depend on the machine.
ORT_THREADS = 1


def model_path(name):
    """Path of a shipped model file (package data)."""
    return resources.files("khe_vol").joinpath(MODEL_DIR, name)


@functools.lru_cache(maxsize=None)
def _sessions():
    """The encoder and decoder sessions, loaded once per process and checked against their hashes."""
    import onnxruntime as ort  # the learned engine only: the classical path never loads it

    sessions = []
    for name in (ENCODER_FILE, DECODER_FILE):
        data = model_path(name).read_bytes()
        expected = MODEL_SHA256[name]
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise SegmentationError(f"{model_path(name)}: the model file is damaged or replaced (SHA-256 differs); "
                                    "reinstall khe-vol")
        options = ort.SessionOptions()
        options.intra_op_num_threads = ORT_THREADS
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sessions.append(ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"]))
    return tuple(sessions)


def intensity_window(image):
    """The model's intensity window of a series: its 0.5th and 99.5th percentiles.

    LiteMedSAM's MR training data were clipped so; taken over all voxels,
    so z-scored or signed data keep their lower half.

    Returns
    -------
    (float, float)
        ``lo < hi`` in image units.
    """
    lo, hi = (float(v) for v in np.percentile(np.asarray(image, np.float32), [0.5, 99.5]))
    if not hi > lo:
        raise SegmentationError("the image is uniform: the learned engine has no intensities to read")
    return lo, hi


def _area_matrix(n_in, n_out):
    """(n_out, n_in) weights of area averaging (each output pixel the mean of what it covers)."""
    scale = n_in / n_out
    edges = np.arange(n_out + 1) * scale
    lo, hi = edges[:-1, None], edges[1:, None]
    left = np.arange(n_in)[None, :]
    weights = np.clip(np.minimum(hi, left + 1) - np.maximum(lo, left), 0.0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def _linear_matrix(n_in, n_out):
    """(n_out, n_in) linear interpolation weights, pixel centres aligned (half-pixel convention)."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    weights = np.zeros((n_out, n_in))
    weights[np.arange(n_out), lo] += 1.0 - (src - lo)
    weights[np.arange(n_out), hi] += src - lo
    return weights


def slice_input(slice_2d, window):
    """One slice as the encoder's input.

    Parameters
    ----------
    slice_2d : (H, W) ndarray
        Image units; rows are the first array axis.
    window : (float, float)
        :func:`intensity_window` of the series.

    Returns
    -------
    image : ndarray of float32, shape (1, 3, 256, 256)
        Windowed to 0-255, resized to 256 on the long side (area averaging),
        rescaled to [0, 1], zero-padded at the bottom and right, three channels.
    resized_hw : (int, int)
        The unpadded extent, for :func:`slice_mask`.
    """
    lo, hi = window
    values = np.asarray(slice_2d, np.float64)
    scaled = (np.clip(values, lo, hi) - lo) / (hi - lo) * 255.0
    h, w = scaled.shape
    factor = MODEL_SIZE / max(h, w)
    newh, neww = int(h * factor + 0.5), int(w * factor + 0.5)
    resized = _area_matrix(h, newh) @ scaled @ _area_matrix(w, neww).T
    span = float(resized.max() - resized.min())
    resized = (resized - resized.min()) / max(span, 1e-8)
    padded = np.zeros((MODEL_SIZE, MODEL_SIZE), np.float32)
    padded[:newh, :neww] = resized
    return np.repeat(padded[None, None], 3, axis=1), (newh, neww)


def slice_embedding(slice_2d, window):
    """The encoder's embedding of one slice: ``(embedding, resized_hw)``."""
    encoder, _ = _sessions()
    image, resized_hw = slice_input(slice_2d, window)
    return encoder.run(None, {"image": image})[0], resized_hw


def slice_mask(embedding, resized_hw, slice_shape, box_rc):
    """The model's mask for one box on one slice.

    Parameters
    ----------
    embedding : ndarray
        :func:`slice_embedding`'s.
    resized_hw : (int, int)
    slice_shape : (int, int)
        ``(H, W)`` of the slice.
    box_rc : (r0, c0, r1, c1)
        Inclusive pixel range of the box (rows, columns).

    Returns
    -------
    ndarray of bool, shape ``slice_shape``
    """
    _, decoder = _sessions()
    r0, c0, r1, c1 = box_rc
    factor = MODEL_SIZE / max(slice_shape)
    # Pixel (r, c) covers [c, c + 1) x [r, r + 1) in the prompt's continuous frame (x = columns).
    box = np.array([[c0, r0, c1 + 1, r1 + 1]], np.float64) * factor
    logits = decoder.run(None, {"embedding": embedding, "boxes": box.astype(np.float32)})[0]
    newh, neww = resized_hw
    h, w = slice_shape
    full = _linear_matrix(newh, h) @ np.asarray(logits[0, 0, :newh, :neww], np.float64) @ _linear_matrix(neww, w).T
    return full > 0.0


def slice_axis(spacing_mm):
    """The axis slices are taken across: the thickest voxels' (the last of equals: axial on an isotropic
    RAS+ canonical grid)."""
    spacing = np.asarray(spacing_mm, float)
    return int(np.flatnonzero(spacing >= spacing.max() * (1.0 - RADIUS_RTOL))[-1])


def box_voxels(box_ras_mm, affine, shape):
    """The voxel range a RAS+ mm box covers on a grid.

    Parameters
    ----------
    box_ras_mm : (6,) array_like
        Two opposite corners ``x0, y0, z0, x1, y1, z1``, scanner RAS+ mm.
    affine : (4, 4) array_like
    shape : sequence of int

    Returns
    -------
    tuple of slice
        The voxels whose centres lie inside the box's footprint on the
        grid (the bounding range of its eight corners), clipped to the image.

    Raises
    ------
    SegmentationError
        Not six finite numbers, or no voxel inside.
    """
    corners = np.asarray(box_ras_mm, float).reshape(-1)
    if corners.size != 6 or not np.all(np.isfinite(corners)):
        raise SegmentationError(f"a box is six finite numbers x0,y0,z0,x1,y1,z1 (RAS+ mm), not {list(box_ras_mm)}")
    lo, hi = np.minimum(corners[:3], corners[3:]), np.maximum(corners[:3], corners[3:])
    cube = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = world_to_voxel(cube, affine)
    first = np.maximum(np.ceil(ijk.min(axis=0) - 1e-6), 0).astype(int)
    last = np.minimum(np.floor(ijk.max(axis=0) + 1e-6), np.asarray(shape[:3]) - 1).astype(int)
    if np.any(last < first):
        raise SegmentationError(
            f"the box ({', '.join(f'{v:.1f}' for v in corners)}) RAS+ mm holds no voxel of the image")
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(first, last))


def _rect(mask_2d):
    """Inclusive (r0, c0, r1, c1) of a 2D mask."""
    first, last = bounding_box(mask_2d)
    return int(first[0]), int(first[1]), int(last[0]), int(last[1])


def _widen(rect, pad_px, limit):
    r0, c0, r1, c1 = rect
    lr0, lc0, lr1, lc1 = limit
    return (max(r0 - pad_px[0], lr0), max(c0 - pad_px[1], lc0), min(r1 + pad_px[0], lr1), min(c1 + pad_px[1], lc1))


def _in_rect(mask_2d, rect, pad_px=(0, 0)):
    """``mask_2d`` outside ``rect`` widened by ``pad_px`` cleared (the model's answer is about its box)."""
    r0, c0, r1, c1 = _widen(rect, pad_px, (0, 0, mask_2d.shape[0] - 1, mask_2d.shape[1] - 1))
    out = np.zeros_like(mask_2d)
    out[r0:r1 + 1, c0:c1 + 1] = mask_2d[r0:r1 + 1, c0:c1 + 1]
    return out


def display_view(slice_2d):
    """A canonical (RAS+) slice as a radiologist views it: rows along the later in-plane axis
    reversed (anterior or superior up), columns along the earlier reversed (patient's right on
    the left). :func:`from_display` undoes it."""
    return np.asarray(slice_2d)[::-1, ::-1].T


def from_display(view_2d):
    """The inverse of :func:`display_view`."""
    return np.asarray(view_2d).T[::-1, ::-1]


def display_rect(rect, shape_2d):
    """An inclusive (r0, c0, r1, c1) box of a canonical slice on :func:`display_view`."""
    a0, b0, a1, b1 = rect
    na, nb = shape_2d
    return nb - 1 - b1, na - 1 - a1, nb - 1 - b0, na - 1 - a0


class SliceEncoder:
    """Embeddings of one series' slices, computed once each (a reader's next box reuses them).

    Parameters
    ----------
    image : (I, J, K) ndarray
        On the canonical RAS+ grid.
    axis : int
        The slice axis (:func:`slice_axis`).
    """

    def __init__(self, image, axis):
        self.image = np.asarray(image)
        self.axis = axis
        self.window = intensity_window(self.image)
        self._cache = {}

    def slice_shape(self):
        return tuple(n for a, n in enumerate(self.image.shape) if a != self.axis)

    def mask(self, k, rect):
        """The model's mask on slice ``k`` for the box ``rect`` (inclusive, canonical slice indices)."""
        if k not in self._cache:
            view = display_view(np.take(self.image, k, axis=self.axis))
            self._cache[k] = (*slice_embedding(view, self.window), view.shape)
        embedding, resized_hw, view_shape = self._cache[k]
        on_view = display_rect(rect, self.slice_shape())
        return _in_rect(from_display(slice_mask(embedding, resized_hw, view_shape, on_view)), rect)


def _place(volume, axis, k, mask_2d):
    index = [slice(None)] * 3
    index[axis] = k
    volume[tuple(index)] = mask_2d


def segment_box(image, affine, box_ras_mm, carry_pad_mm=5.0, encoder=None):
    """The lesion inside a reader's 3D box (see the module notes).

    Parameters
    ----------
    image : (I, J, K) array_like
    affine : (4, 4) array_like
        Voxel-to-world RAS+ mm.
    box_ras_mm : (6,) array_like
        Corners ``x0, y0, z0, x1, y1, z1``, scanner RAS+ mm; its extent
        across the slice axis is the slice range.
    carry_pad_mm : float
        A slice's box is the mask found on its neighbour towards the middle,
        widened by this much, mm (inside the 3D box).
    encoder : SliceEncoder, optional
        Kept embeddings of this image on the canonical grid (a reader's session).

    Returns
    -------
    mask : ndarray of uint8
        In the image's own array order.
    info : dict
        ``engine``, ``slice_axis``, ``slices`` (first, last), ``n_voxels``,
        ``volume_ml``.
    """
    canonical, canon_affine, ornt = to_canonical(image, affine)
    spacing = voxel_sizes_mm(canon_affine)
    axis = slice_axis(spacing)
    box = box_voxels(box_ras_mm, canon_affine, canonical.shape)
    encoder = encoder if encoder is not None else SliceEncoder(canonical, axis)
    out = carried_box_mask(encoder, box, spacing, carry_pad_mm)
    mask = from_canonical(out.astype(np.uint8), ornt)
    return mask, _info("learned", axis, (box[axis].start, box[axis].stop - 1), mask, affine)


def carried_box_mask(encoder, box, spacing_mm, carry_pad_mm):
    """The model's mask inside a voxel box of the encoder's (canonical) grid, carried from the
    box's middle slice outwards (see the module notes).

    Returns
    -------
    ndarray of bool
        On the encoder's grid.
    """
    axis = encoder.axis
    in_plane = [a for a in range(3) if a != axis]
    limit = (box[in_plane[0]].start, box[in_plane[1]].start, box[in_plane[0]].stop - 1, box[in_plane[1]].stop - 1)
    pad_px = tuple(int(np.ceil(carry_pad_mm / spacing_mm[a] - 1e-9)) for a in in_plane)
    first, last = box[axis].start, box[axis].stop - 1
    middle = (first + last) // 2
    out = np.zeros(encoder.image.shape, bool)
    mid_mask = encoder.mask(middle, limit)
    _place(out, axis, middle, mid_mask)
    for step in (-1, 1):
        previous, k = mid_mask, middle + step
        while first <= k <= last and previous.any():
            previous = encoder.mask(k, _widen(_rect(previous), pad_px, limit))
            _place(out, axis, k, previous)
            k += step
    return out


def segment_slice_boxes(image, affine, guide, pad_mm=3.0, encoder=None):
    """The model's mask on every slice of a guide mask, each slice prompted with the guide's box there.

    Parameters
    ----------
    image : (I, J, K) array_like
    affine : (4, 4) array_like
    guide : (I, J, K) array_like of bool
        A lesion mask (the classical engine's); its box on each slice,
        widened by ``pad_mm``, prompts the model there.
    pad_mm : float
    encoder : SliceEncoder, optional

    Returns
    -------
    mask : ndarray of uint8
    info : dict
    """
    canonical, canon_affine, ornt = to_canonical(image, affine)
    guide = to_canonical(np.asarray(guide) != 0, affine)[0]
    spacing = voxel_sizes_mm(canon_affine)
    axis = slice_axis(spacing)
    encoder = encoder if encoder is not None else SliceEncoder(canonical, axis)
    in_plane = [a for a in range(3) if a != axis]
    pad_px = tuple(int(np.ceil(pad_mm / spacing[a] - 1e-9)) for a in in_plane)
    shape_2d = encoder.slice_shape()
    whole = (0, 0, shape_2d[0] - 1, shape_2d[1] - 1)
    out = np.zeros(canonical.shape, bool)
    slices = np.flatnonzero(guide.any(axis=tuple(in_plane)))
    for k in slices:
        rect = _widen(_rect(np.take(guide, k, axis=axis)), pad_px, whole)
        _place(out, axis, int(k), encoder.mask(int(k), rect))
    mask = from_canonical(out.astype(np.uint8), ornt)
    span = (int(slices[0]), int(slices[-1])) if slices.size else None
    return mask, _info("hybrid", axis, span, mask, affine)


def engine_mask(image, affine, classical_mask, params):
    """The automatic path's learned mask from the classical one (``params.engine``).

    ``learned``: the classical mask's 3D box, widened by
    ``params.learned_pad_mm`` in plane (its slice range as it is), carried
    slice to slice (:func:`carried_box_mask`). ``hybrid``: every slice of
    the classical mask prompted with its own box there
    (:func:`segment_slice_boxes`).

    Parameters
    ----------
    image : (I, J, K) array_like
    affine : (4, 4) array_like
    classical_mask : (I, J, K) array_like of bool
        Not empty.
    params : SegmentationParams

    Returns
    -------
    mask : ndarray of uint8
    info : dict
    """
    if params.engine == "hybrid":
        return segment_slice_boxes(image, affine, classical_mask, params.learned_pad_mm)
    if params.engine != "learned":
        raise SegmentationError(f"engine_mask is for the learned and hybrid engines, not {params.engine!r}")
    canonical, canon_affine, ornt = to_canonical(image, affine)
    guide = to_canonical(np.asarray(classical_mask) != 0, affine)[0]
    spacing = voxel_sizes_mm(canon_affine)
    axis = slice_axis(spacing)
    first, last = bounding_box(guide)
    pad = [0 if a == axis else int(np.ceil(params.learned_pad_mm / spacing[a] - 1e-9)) for a in range(3)]
    box = tuple(slice(max(int(f) - p, 0), min(int(l) + p + 1, n))
                for f, l, p, n in zip(first, last, pad, canonical.shape))
    out = carried_box_mask(SliceEncoder(canonical, axis), box, spacing, params.learned_pad_mm)
    mask = from_canonical(out.astype(np.uint8), ornt)
    return mask, _info("learned", axis, (box[axis].start, box[axis].stop - 1), mask, affine)


def _info(engine, axis, span, mask, affine):
    n = int(np.count_nonzero(mask))
    return {
        "engine": engine,
        "slice_axis": int(axis),
        "slices": list(span) if span else None,
        "n_voxels": n,
        "volume_ml": float(n * abs(np.linalg.det(np.asarray(affine, float)[:3, :3])) / 1000.0),
    }
