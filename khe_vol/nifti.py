"""Reading and validating NIfTI series and masks; writing NIfTI reproducibly.

Every error names the file and says what is wrong in words a study
coordinator can act on. Inputs are only ever opened for reading.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

# Atomic writes and file checksums live in khe_vol.files; re-exported here for existing callers.
from khe_vol.files import atomic_write_bytes, atomic_write_text, sha256_file  # noqa: F401
from khe_vol.geometry import affine_disagreement, voxel_sizes_mm

#: Plausible voxel edge lengths for clinical MRI, in mm.
VOXEL_SIZE_RANGE_MM = (0.05, 20.0)

#: Fewest voxels along any array axis: a lesion volume needs slices around
#: it; one or two slices are a localiser or a 2D image, not a volume.
MIN_SLICES = 3

#: An sform and a qform that place the field of view further apart than
#: this (mm, largest displacement of a voxel) or turn its axes by more than
#: this (degrees) disagree: software reading the other one shows the image
#: (and a reader's mask or seed) elsewhere. Float32 storage and quaternion
#: rounding stay far below both.
GEOMETRY_TOLERANCE_MM = 1.0
GEOMETRY_TOLERANCE_DEG = 1.0


class SeriesError(ValueError):
    """A series or mask cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class LoadedImage:
    """A validated 3D image on its native grid.

    Attributes
    ----------
    data : ndarray, shape (I, J, K)
        Voxel values (scaled by scl_slope/scl_inter), float32.
    affine : ndarray, shape (4, 4)
        Voxel-to-world RAS+ mm affine as nibabel chooses it.
    affine_source : str
        ``"sform"`` or ``"qform"``: which header field the affine came from.
    path : Path
    sha256 : str
        Of the file's bytes as stored.
    """

    data: np.ndarray
    affine: np.ndarray
    affine_source: str
    path: Path
    sha256: str
    geometry_disagreement: dict | None = None
    """``{"distance_mm", "rotation_deg", "used"}`` when the header's sform and
    qform (both coded) disagree beyond :data:`GEOMETRY_TOLERANCE_MM` /
    :data:`GEOMETRY_TOLERANCE_DEG`; ``None`` otherwise."""


def _chosen_affine(img, path):
    """The affine nibabel uses, and which header field it came from.

    nibabel prefers the sform when its code is set, then the qform; with both
    codes 0 it falls back to pixdim alone, which loses the scanner frame, so
    that is refused rather than guessed.
    """
    header = img.header
    try:
        sform, scode = header.get_sform(coded=True)
        # The qform is only read when it is the one used: a junk qform beside
        # a valid sform does not matter.
        qform, qcode = (None, 0) if sform is not None and int(scode) > 0 else header.get_qform(coded=True)
    except Exception as exc:  # nibabel's HeaderDataError (bad quaternion, ...)
        raise SeriesError(f"{path}: unreadable orientation in the header ({exc})") from exc
    if sform is not None and int(scode) > 0:
        affine, source = sform, "sform"
    elif qform is not None and int(qcode) > 0:
        affine, source = qform, "qform"
    else:
        raise SeriesError(
            f"{path}: no scanner orientation (sform_code and qform_code are both 0), "
            "so positions in mm cannot be trusted; re-export the series from the scanner DICOM"
        )
    if source == "qform":
        # nibabel silently replaces a pixdim of 0 by 1 mm when it reads the
        # header; the qform's voxel size would then be a guess, so look at
        # the header as stored.
        with ImageOpener(path) as fh:
            pixdim = type(header).from_fileobj(fh, check=False)["pixdim"][1:4]
        if np.any(pixdim == 0):
            raise SeriesError(
                f"{path}: the qform has a voxel size of 0 (pixdim {pixdim.tolist()}), "
                "so the voxel volume is unknown"
            )
    affine = np.asarray(affine, dtype=float)
    if not np.all(np.isfinite(affine)):
        raise SeriesError(f"{path}: the {source} affine contains NaN or infinite values")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise SeriesError(f"{path}: the {source} affine is singular (zero voxel volume)")
    lo, hi = VOXEL_SIZE_RANGE_MM
    sizes = voxel_sizes_mm(affine)
    if np.any(sizes < lo) or np.any(sizes > hi):
        raise SeriesError(
            f"{path}: implausible voxel size {np.round(sizes, 4).tolist()} mm "
            f"(expected {lo} to {hi} mm per axis)"
        )
    return affine, source


def geometry_disagreement(header, shape):
    """How far a header's sform and qform disagree, when both are coded.

    nibabel (and khe-vol) use the sform when its code is set; a viewer or
    converter that reads the qform would place the image elsewhere.

    Parameters
    ----------
    header : nibabel Nifti1Header or Nifti2Header
    shape : tuple of int
        Spatial shape of the image.

    Returns
    -------
    dict or None
        ``distance_mm``: largest displacement of a voxel of the field of
        view between the two; ``rotation_deg``: largest angle between
        corresponding voxel axes; ``used``: ``"sform"``. ``None`` when one
        code is 0, the qform is unreadable, or both agree within
        :data:`GEOMETRY_TOLERANCE_MM` and :data:`GEOMETRY_TOLERANCE_DEG`.
    """
    try:
        sform, scode = header.get_sform(coded=True)
        qform, qcode = header.get_qform(coded=True)
    except Exception:  # an unreadable qform beside a valid sform is never used
        return None
    if sform is None or qform is None or int(scode) <= 0 or int(qcode) <= 0:
        return None
    distance_mm, rotation_deg = affine_disagreement(sform, qform, shape)
    if distance_mm <= GEOMETRY_TOLERANCE_MM and rotation_deg <= GEOMETRY_TOLERANCE_DEG:
        return None
    return {"distance_mm": round(distance_mm, 2), "rotation_deg": round(rotation_deg, 2), "used": "sform"}


#: Where a DICOM Part 10 file says so: "DICM" after its 128-byte preamble.
DICOM_MARKER_OFFSET = 128


def is_dicom_file(path):
    """Whether a file is DICOM Part 10 (the ``DICM`` marker), also when gzip-compressed.

    Files are copied by hand and renamed: a ``.dcm`` saved as ``_T2w.nii.gz``
    would otherwise fail as "not a gzip file", named ``.nii`` as nibabel's
    "Cannot work out file type".
    """
    end = DICOM_MARKER_OFFSET + 4
    try:
        with open(path, "rb") as fh:
            head = fh.read(end)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as fh:
                head = fh.read(end)
    except (OSError, EOFError, zlib.error):
        return False
    return head[DICOM_MARKER_OFFSET:end] == b"DICM"


def open_image(path, kind="series"):
    """Open a NIfTI file and validate its header, without reading voxel data.

    Returns
    -------
    img : nibabel image
    shape : tuple of int
        Spatial shape (a singleton 4th dimension dropped).
    affine : ndarray, shape (4, 4)
    affine_source : str

    Raises
    ------
    SeriesError
        Missing, empty or non-NIfTI file; not 3D; unusable affine;
        implausible voxel sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise SeriesError(f"{path}: {kind} file does not exist")
    if path.stat().st_size == 0:
        raise SeriesError(f"{path}: {kind} file is empty (0 bytes)")
    if is_dicom_file(path):
        raise SeriesError(f"{path}: this is a DICOM file, not NIfTI (whatever its name says); convert the "
                          "site's DICOM folder with `khe-vol import` (see the README's DICOM section)")
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises many types for foreign files
        raise SeriesError(f"{path}: not a readable NIfTI file ({exc})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise SeriesError(f"{path}: not a NIfTI-1/2 image (nibabel read it as {type(img).__name__})")
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) < 3 and min(shape, default=0) >= 1:
        raise SeriesError(f"{path}: one slice (a 2D image of shape {tuple(img.shape)}): a 3D volume is needed")
    if len(shape) != 3:
        raise SeriesError(
            f"{path}: {kind} must be one 3D volume, but it has shape {tuple(img.shape)}"
            + (f" ({img.shape[3]} volumes)" if len(img.shape) == 4 else "")
        )
    if min(shape) < 1:
        raise SeriesError(f"{path}: {kind} has an empty dimension, shape {tuple(img.shape)}")
    if min(shape) == 1:
        raise SeriesError(f"{path}: one slice (shape {shape}): a 3D volume is needed")
    if min(shape) < MIN_SLICES:
        axis = int(np.argmin(shape))
        raise SeriesError(
            f"{path}: only {shape[axis]} slices along array axis {axis} (shape {shape}): "
            f"a 3D volume of at least {MIN_SLICES} slices is needed"
        )
    dtype = img.get_data_dtype()
    if dtype.kind not in "iuf":
        raise SeriesError(
            f"{path}: {kind} voxels are of type {dtype} ("
            + ("complex" if dtype.kind == "c" else "not plain numbers, e.g. RGB")
            + "); a real-valued (integer or float) image is expected"
        )
    affine, source = _chosen_affine(img, path)
    return img, shape, affine, source


def _stored_image(img, path):
    """The image with its voxel bytes in memory, refusing a file shorter than its header declares.

    Checked before the voxel array is built, so a header declaring a huge
    image over a short file is a clear error rather than an attempt to
    allocate the declared size. A gzip file is decompressed once, through to
    its end (which verifies its CRC), keeping only the declared bytes; the
    image is then built from those, so the series is not decompressed twice.
    """
    offset = getattr(img.dataobj, "offset", None)  # the header copy on the image says 0
    offset = int(img.header.get_data_offset() if offset is None else offset)
    needed = offset + int(np.prod(img.shape, dtype=object)) * img.get_data_dtype().itemsize
    if not str(path).endswith(".gz"):
        have = path.stat().st_size
        if have < needed:
            raise _truncated(img, path, needed, have)
        return img
    try:
        with gzip.open(path, "rb") as fh:
            # In chunks: a header may declare far more than the stream holds,
            # and one read of the declared size would allocate all of it.
            chunks, got = [], 0
            while got < needed:
                chunk = fh.read(min(1 << 24, needed - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            payload = b"".join(chunks)
            while fh.read(1 << 24):  # to the end: the CRC is checked there
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise SeriesError(f"{path}: image data is truncated or corrupt ({exc})") from exc
    if len(payload) < needed:
        raise _truncated(img, path, needed, len(payload))
    return type(img).from_bytes(payload)


def _truncated(img, path, needed, have):
    return SeriesError(
        f"{path}: image data is truncated: the header declares shape {tuple(img.shape)} "
        f"({needed} bytes with the header) but the file holds {have} bytes"
    )


def load_image(path, kind="series"):
    """Open and validate a 3D NIfTI image, voxel data included.

    Parameters
    ----------
    path : path-like
        ``.nii`` or ``.nii.gz`` file.
    kind : str
        Word used in error messages (``"series"`` or ``"mask"``).

    Returns
    -------
    LoadedImage

    Raises
    ------
    SeriesError
        As :func:`open_image`, and for truncated data or NaN/infinite values.
    """
    path = Path(path)
    img, shape, affine, source = open_image(path, kind)
    img = _stored_image(img, path)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise SeriesError(f"{path}: image data is truncated or corrupt ({exc})") from exc
    except MemoryError as exc:
        raise SeriesError(f"{path}: image of shape {tuple(img.shape)} is too large to load") from exc
    n_bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if n_bad:
        raise SeriesError(f"{path}: {n_bad} voxel(s) are NaN or infinite")
    return LoadedImage(data, affine, source, path, sha256_file(path), geometry_disagreement(img.header, shape))


def load_series(path):
    """Load a T2 series; also refuses a constant (blank) image."""
    image = load_image(path, "series")
    if float(image.data.max()) == float(image.data.min()):
        raise SeriesError(f"{image.path}: series is blank (every voxel is {float(image.data.min())})")
    return image


def mask_image(mask, affine):
    """A uint8 0/1 NIfTI image of a mask on a grid, with clean header text fields."""
    img = nib.Nifti1Image((np.asarray(mask) != 0).astype(np.uint8), np.asarray(affine, dtype=float))
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b""
    return img


def nifti_bytes(img, compress=True):
    """Serialise a NIfTI image; gzip with a zero timestamp so reruns give equal bytes."""
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw


def write_nifti(path, img):
    """Atomically write ``img`` to ``path`` (gzip if it ends in .gz), reproducibly."""
    atomic_write_bytes(path, nifti_bytes(img, str(path).endswith(".gz")))
