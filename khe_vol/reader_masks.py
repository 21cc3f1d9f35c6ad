"""Reader masks drawn in ITK-SNAP (NIfTI label maps) or 3D Slicer (``.seg.nrrd``, ``.nrrd``).

Every mask comes back as a uint8 0/1 array indexed ``[i, j, k]`` with a
voxel -> **RAS+ mm** affine (nibabel's convention), so it can be brought
onto a series grid by physical position with
:func:`khe_vol.geometry.resample_mask_to_grid`.

NRRD frames
-----------
An NRRD header states its world frame in ``space``. Slicer writes
``left-posterior-superior`` (LPS, as ITK and DICOM); RAS and LAS also
occur. The voxel -> world matrix has ``space directions`` (one row per
array axis; ``none`` for a non-spatial axis) as its *columns* and
``space origin`` as its translation; it is turned into RAS+ by negating the
world rows that point the other way (x and y for LPS). A ``space`` without
an anatomical meaning (``scanner-xyz``, ``3D-right-handed``) is refused.

Which voxels are lesion
-----------------------
* NIfTI label maps and plain ``.nrrd`` label maps: all non-zero voxels, or
  only voxels equal to ``label`` (an int) when given.
* Every format holds whole numbers >= 0 (:func:`check_label_values`): a
  probability map, an interpolated label map, negative values or an image
  saved as the mask are errors naming the file and what was found.
* Slicer ``.seg.nrrd``: segments are described by ``Segment<N>_Name``,
  ``Segment<N>_LabelValue`` and ``Segment<N>_Layer``; a 4D array stores
  overlapping segments in separate layers along its first axis. The
  segment is ``label`` (a name, case-insensitive, or a label value) when
  given, else chosen by :func:`select_lesion_segment`. Files from Slicer
  before 4.11 lack LabelValue/Layer: segment N is then value 1 in layer N.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import nrrd
import numpy as np

from khe_vol.nifti import LoadedImage, load_image, sha256_file

#: Sign of each NRRD world axis in RAS+ for the anatomical spaces accepted.
NRRD_SPACE_SIGNS = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
}
_SPACE_ALIASES = {"ras": "right-anterior-superior", "las": "left-anterior-superior", "lps": "left-posterior-superior"}

_SEGMENT_KEY = re.compile(r"^Segment(\d+)_(Name|LabelValue|Layer)$")


def is_nrrd(path):
    """Whether a path names an NRRD file (``.nrrd``, ``.seg.nrrd``, ``.nhdr``)."""
    return Path(path).name.lower().endswith((".nrrd", ".nhdr"))


def nrrd_affine_ras(header, path="<nrrd header>"):
    """Voxel -> RAS+ mm affine of the spatial axes of an NRRD header.

    Parameters
    ----------
    header : mapping
        Header as :func:`nrrd.read` returns it (``space``, ``space
        directions``, ``space origin``).
    path : str
        Named in error messages.

    Returns
    -------
    affine : ndarray, shape (4, 4)
        Maps indices of the spatial axes ``(i, j, k)`` (in header order) to
        RAS+ mm.
    spatial_axes : tuple of int
        Which array axes are spatial (the others have direction ``none``).

    Raises
    ------
    ValueError
        No or unknown ``space``, missing or unusable ``space directions``,
        ``space units`` other than mm.
    """
    space = header.get("space")
    if space is None:
        raise ValueError(f"{path}: NRRD header has no 'space' field, so its world frame (RAS or LPS) is unknown")
    space = _SPACE_ALIASES.get(str(space).lower(), str(space).lower())
    if space not in NRRD_SPACE_SIGNS:
        raise ValueError(
            f"{path}: unknown NRRD space {header['space']!r}; expected one of {', '.join(NRRD_SPACE_SIGNS)}"
        )
    if header.get("space directions") is None:
        raise ValueError(f"{path}: NRRD header has no 'space directions', so voxel positions are unknown")
    # pynrrd gives a 'none' direction (non-spatial axis) as a row of NaN; accept None too.
    rows = [None if d is None else np.asarray(d, dtype=float) for d in header["space directions"]]
    spatial_axes = tuple(i for i, d in enumerate(rows) if d is not None and np.all(np.isfinite(d)))
    if len(spatial_axes) != 3:
        raise ValueError(f"{path}: NRRD needs 3 spatial axes in 'space directions', found {len(spatial_axes)}")
    units = header.get("space units")
    if units is not None and any(str(u).lower() != "mm" for u in units):
        raise ValueError(f"{path}: NRRD 'space units' are {list(units)}, expected mm")
    affine_space = np.eye(4)
    # Each direction row is the world step of one array axis: a column here.
    affine_space[:3, :3] = np.stack([rows[i] for i in spatial_axes], axis=1)
    origin = header.get("space origin")
    affine_space[:3, 3] = np.zeros(3) if origin is None else np.asarray(origin, dtype=float)
    if abs(np.linalg.det(affine_space[:3, :3])) < 1e-9:
        raise ValueError(f"{path}: NRRD 'space directions' are singular (zero voxel volume)")
    return np.diag([*NRRD_SPACE_SIGNS[space], 1.0]) @ affine_space, spatial_axes


def slicer_segments(header):
    """Segments described in a Slicer ``.seg.nrrd`` header.

    Parameters
    ----------
    header : mapping
        NRRD header.

    Returns
    -------
    list of dict
        ``{"index", "name", "label_value", "layer"}`` per segment, by index;
        empty if the header describes none.
    """
    fields = {}
    for key, value in header.items():
        match = _SEGMENT_KEY.match(key)
        if match:
            fields.setdefault(int(match.group(1)), {})[match.group(2)] = str(value).strip()
    layered = int(header.get("dimension", 3)) == 4
    return [
        {
            "index": index,
            "name": f.get("Name", f"Segment_{index}"),
            "label_value": int(f.get("LabelValue", 1)),
            # Before Slicer 4.11 each segment had its own layer, value 1.
            "layer": int(f.get("Layer", index if layered else 0)),
        }
        for index, f in sorted(fields.items())
    ]


def select_lesion_segment(segments, path="<segmentation>"):
    """The segment that holds the lesion.

    A segment whose name contains "lesion" (case-insensitive; an exact
    "lesion" wins over e.g. "lesion 2") if there is one, else the only
    segment.

    Parameters
    ----------
    segments : list of dict
        As :func:`slicer_segments` returns.
    path : str
        Named in error messages.

    Raises
    ------
    ValueError
        No segments; several segments and none (or several) named like
        "lesion". The message lists the names.
    """
    if not segments:
        raise ValueError(f"{path}: segmentation has no segments")
    names = ", ".join(repr(s["name"]) for s in segments)
    exact = [s for s in segments if s["name"].strip().lower() == "lesion"]
    like = [s for s in segments if "lesion" in s["name"].lower()]
    for candidates in (exact, like):
        if len(candidates) == 1:
            return candidates[0]
    if like:
        raise ValueError(f"{path}: several segments are named like 'lesion' ({names}); pass label= to choose one")
    if len(segments) == 1:
        return segments[0]
    raise ValueError(f"{path}: no segment named like 'lesion' among {names}; pass label= to choose one")


def _find_segment(segments, label, path):
    """The segment a caller asked for: by name (str, case-insensitive) or label value (int)."""
    if isinstance(label, str):
        found = [s for s in segments if s["name"].strip().lower() == label.strip().lower()]
    else:
        found = [s for s in segments if s["label_value"] == int(label)]
    if len(found) != 1:
        names = ", ".join(f"{s['name']!r} (value {s['label_value']}, layer {s['layer']})" for s in segments)
        how = "no" if not found else "more than one"
        raise ValueError(f"{path}: {how} segment matches label={label!r}; segments: {names}")
    return found[0]


#: A label map holds background and a few labels; more distinct non-zero
#: values than this means an image was saved under the mask's name.
MAX_MASK_LABELS = 64


def check_label_values(data, path):
    """Refuse voxel values a label map cannot hold, saying what was found.

    Every mask format goes through this (NIfTI, Slicer ``.seg.nrrd``, NRRD
    label maps): 0 is background, whole numbers >= 1 are labels.

    Parameters
    ----------
    data : ndarray
        Voxel values as stored (scaling applied).
    path : path-like
        Named in error messages.

    Returns
    -------
    ndarray
        ``data``, unchanged.

    Raises
    ------
    ValueError
        Complex or structured (RGB) values; NaN or infinite values; negative
        values; non-integer values (a probability map when they lie between
        0 and 1, else an interpolated label map or an image); more than
        :data:`MAX_MASK_LABELS` distinct labels (an image).
    """
    data = np.asarray(data)
    if data.dtype.kind not in "iubf":
        what = "complex" if data.dtype.kind == "c" else "not plain numbers, e.g. RGB"
        raise ValueError(f"{path}: mask voxels are of type {data.dtype} ({what}); "
                         "a label map of whole numbers (0 = background) is expected")
    if data.dtype.kind == "b" or data.size == 0:
        return data
    if data.dtype.kind == "f":
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if n_bad:
            raise ValueError(f"{path}: {n_bad} mask voxel(s) are NaN or infinite, so it is not a label map")
    lo, hi = data.min(), data.max()
    if lo < 0:
        raise ValueError(
            f"{path}: mask has negative values (lowest {float(lo):g}); a label map holds 0 (background) "
            "and positive labels: is this an image rather than a mask?"
        )
    if data.dtype.kind == "f":
        fractional = data != np.round(data)
        if fractional.any():
            example = float(data[fractional][0])
            if hi <= 1:
                raise ValueError(
                    f"{path}: mask has non-integer values between 0 and 1 (e.g. {example:.3g}): "
                    "a probability map? Threshold it and save it as a label map (0 = background, 1 = lesion)"
                )
            raise ValueError(
                f"{path}: mask has non-integer values (e.g. {example:.3g}, up to {float(hi):g}): a label map "
                "resampled with linear interpolation, or an image? Save it with nearest-neighbour "
                "interpolation as whole-number labels"
            )
    labels = np.unique(data)
    n_labels = int(np.count_nonzero(labels))
    if n_labels > MAX_MASK_LABELS:
        raise ValueError(
            f"{path}: mask has {n_labels} different non-zero values (a label map has a few labels, at most "
            f"{MAX_MASK_LABELS} here): is this the T2 image rather than its lesion mask?"
        )
    return data


def _label_mask(labels, label, path):
    """0/1 mask of ``label`` (an int), or of every non-zero voxel when ``None``."""
    if isinstance(label, str):
        # A name is a valid label for a Slicer file, just not for this one:
        # a ValueError, like every other problem with a mask file.
        raise ValueError(  # noqa: TRY004
            f"{path}: label={label!r} is a segment name, but this file is a plain label map; pass a label value"
        )
    if label is None:
        return labels != 0
    mask = labels == int(label)
    if not mask.any():
        present = sorted(int(v) for v in np.unique(labels) if v != 0)
        raise ValueError(f"{path}: label {label} is not in the mask (labels present: {present})")
    return mask


def _load_nrrd(path, label):
    try:
        data, header = nrrd.read(str(path), index_order="F")
    except Exception as exc:  # pynrrd raises NRRDError, OSError, zlib/bz2 errors...
        raise ValueError(f"{path}: not a readable NRRD file ({exc})") from exc
    affine, spatial_axes = nrrd_affine_ras(header, path)
    data = check_label_values(data, path)
    segments = slicer_segments(header)
    if data.ndim == 4:
        if spatial_axes != (1, 2, 3):
            raise ValueError(f"{path}: 4D NRRD must have its layer axis first (space direction 'none'), got spatial axes {spatial_axes}")
        if not segments:
            raise ValueError(f"{path}: 4D layered segmentation with no Segment<N>_ fields, so its layers cannot be interpreted")
    elif data.ndim != 3:
        raise ValueError(f"{path}: mask must be 3D (or 4D Slicer layers), but has shape {data.shape}")
    if not segments:
        return _label_mask(data, label, path), affine
    segment = select_lesion_segment(segments, path) if label is None else _find_segment(segments, label, path)
    layers = data if data.ndim == 4 else data[np.newaxis]
    if not 0 <= segment["layer"] < layers.shape[0]:
        raise ValueError(f"{path}: segment {segment['name']!r} is in layer {segment['layer']}, but the file has {layers.shape[0]} layer(s)")
    return layers[segment["layer"]] == segment["label_value"], affine


def read_reader_mask(path, label=None):
    """A reader's lesion mask as a validated image, empty or not.

    Parameters
    ----------
    path, label
        As :func:`load_reader_mask`.

    Returns
    -------
    khe_vol.nifti.LoadedImage
        ``data`` uint8 0/1 (1 = lesion) indexed like the file's spatial
        axes, ``affine`` voxel -> RAS+ mm, ``affine_source`` (``sform``,
        ``qform`` or ``nrrd space directions``), and for NIfTI the sform/qform
        disagreement (:attr:`~khe_vol.nifti.LoadedImage.geometry_disagreement`).

    Raises
    ------
    ValueError
        Naming the file and the problem (see :func:`load_reader_mask`),
        except an empty mask.
    """
    path = Path(path)
    if is_nrrd(path):
        mask, affine = _load_nrrd(path, label)
        return LoadedImage(mask.astype(np.uint8), np.asarray(affine, dtype=float), "nrrd space directions",
                           path, sha256_file(path))
    image = load_image(path, "mask")  # SeriesError is a ValueError naming the file
    mask = _label_mask(check_label_values(image.data, path), label, path)
    return dataclasses.replace(image, data=mask.astype(np.uint8))


def load_reader_mask(path, label=None):
    """Load a reader's lesion mask and its RAS+ affine.

    Parameters
    ----------
    path : path-like
        NIfTI label map (``.nii``, ``.nii.gz``; ITK-SNAP), Slicer
        segmentation (``.seg.nrrd``) or NRRD label map (``.nrrd``, raw or
        gzip encoded).
    label : int or str, optional
        Label value to take (int), or a Slicer segment name (str). Default:
        every non-zero voxel of a label map; the segment chosen by
        :func:`select_lesion_segment` of a Slicer segmentation.

    Returns
    -------
    mask : ndarray of uint8, shape (I, J, K)
        1 = lesion, indexed like the file's spatial axes.
    affine_ras : ndarray, shape (4, 4)
        Voxel -> RAS+ mm.

    Raises
    ------
    ValueError
        Naming the file and the problem: unreadable file, unknown space,
        missing space directions, layered file without segments, no or
        ambiguous lesion segment, values that are not a label map
        (:func:`check_label_values`), empty mask.
    """
    image = read_reader_mask(path, label)
    if not image.data.any():
        raise ValueError(f"{path}: mask is empty (no lesion voxels" + (f" with label {label!r})" if label is not None else ")"))
    return image.data, image.affine
