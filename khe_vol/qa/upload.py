"""A reader's edited-mask upload, checked before it costs the server anything.

An upload is hostile until checked. Its header (the first 348 bytes, NIfTI-1)
is read and checked against the case grid *before* any voxel data is
decompressed: shape, orientation and position, an integer label type, no
intensity scaling, a data offset within the header and a small extension
block. Only then is the body decompressed, and never past the size that
header declares, so a gzip bomb or a header announcing a gigabyte of
offset costs at most the case's own voxel count; the upload itself is read
only up to the largest size a mask of the case can have
(:func:`max_upload_bytes`). The voxels must be
non-negative integer labels (0 background; NiiVue's pen colours 1, 2, ...
are all lesion): float, negative, complex, RGB or NaN "masks" are refused,
not binarised.

Every refusal is an :class:`UploadRefused` (a ``ValueError``) whose message
is for the reader's screen.
"""

from __future__ import annotations

import io
import zlib

import nibabel as nib
import numpy as np

from khe_vol.qa.deidentify import same_grid

#: NIfTI-1 header size, bytes; the voxels start at ``vox_offset`` (>= 352, after the 4-byte extension flag).
NIFTI1_HEADER_BYTES = 348
NIFTI1_MIN_OFFSET = 352

#: Largest accepted extension block between the header and the voxels, bytes
#: (a drawing needs none; NiiVue writes none).
MAX_EXTENSION_BYTES = 64 * 1024

#: NIfTI datatype codes a label mask may be stored as (integers only).
LABEL_DATATYPES = {2: "uint8", 256: "int8", 4: "int16", 512: "uint16", 8: "int32", 768: "uint32"}

_GZIP_MAGIC = b"\x1f\x8b"

#: Bytes per voxel of the widest label type (:data:`LABEL_DATATYPES`).
_MAX_LABEL_ITEMSIZE = 4


def max_upload_bytes(case_shape):
    """The largest upload that can hold a mask of the case grid, bytes.

    A NIfTI-1 file of the widest label type with the largest accepted
    extension block, stored uncompressed or as gzip of incompressible bytes
    (deflate's stored blocks: 5 bytes per 64 KiB, plus header and trailer).
    Anything longer is refused before it is read into memory.
    """
    raw = NIFTI1_MIN_OFFSET + MAX_EXTENSION_BYTES + int(np.prod(case_shape)) * _MAX_LABEL_ITEMSIZE
    return raw + raw // 1000 + 4096


def read_upload(stream, case_shape):
    """An upload's bytes from a file-like ``stream``, reading at most :func:`max_upload_bytes` + 1.

    Raises
    ------
    UploadRefused
        A longer upload (nothing more of it is read).
    """
    limit = max_upload_bytes(case_shape)
    payload = stream.read(limit + 1)
    _check_length(payload, limit)
    return payload


def _check_length(payload, limit):
    if len(payload) > limit:
        raise UploadRefused(f"the uploaded mask is larger than any mask of this case can be (more than {limit} "
                            "bytes); save the drawing from the app")


class UploadRefused(ValueError):
    """An upload that is not a 0/1 mask on the case grid; the message says why, for the reader."""


def _inflate(payload, limit):
    """Decompress a gzip payload (every member), refusing more than ``limit`` bytes or a truncated stream."""
    out, rest = bytearray(), payload
    while rest:
        inflater = zlib.decompressobj(wbits=31)
        try:
            out += inflater.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            raise UploadRefused(f"the uploaded mask is not valid gzip ({exc})") from None
        if len(out) > limit:
            raise UploadRefused(f"the uploaded mask holds more data than its header declares ({limit} bytes)")
        if not inflater.eof:
            raise UploadRefused("the uploaded mask is a truncated gzip file; save it again")
        rest = inflater.unused_data
    return bytes(out)


def _head(payload):
    """The first bytes of the (possibly gzip) payload, enough for a NIfTI-1 header."""
    if payload[:2] != _GZIP_MAGIC:
        return payload[:NIFTI1_MIN_OFFSET]
    inflater = zlib.decompressobj(wbits=31)
    try:
        head = inflater.decompress(payload, NIFTI1_MIN_OFFSET)
    except zlib.error as exc:
        raise UploadRefused(f"the uploaded mask is not valid gzip ({exc})") from None
    if len(head) < NIFTI1_MIN_OFFSET and not inflater.eof:
        raise UploadRefused("the uploaded mask is a truncated gzip file; save it again")
    return head


def mask_header(head):
    """Parse and check a NIfTI-1 header from the first bytes of an upload.

    Parameters
    ----------
    head : bytes
        At least :data:`NIFTI1_HEADER_BYTES` bytes.

    Returns
    -------
    nibabel.Nifti1Header

    Raises
    ------
    UploadRefused
        Too short, NIfTI-2 or not NIfTI, or a header nibabel cannot read.
    """
    if len(head) < NIFTI1_HEADER_BYTES:
        raise UploadRefused("the uploaded mask is not a NIfTI-1 image (shorter than its 348-byte header)")
    sizeof_hdr = int.from_bytes(head[:4], "little")
    if sizeof_hdr not in (348, 348 << 24):
        kind = "NIfTI-2" if sizeof_hdr in (540, 540 << 24) else "not NIfTI"
        raise UploadRefused(f"the uploaded mask is not a NIfTI-1 image ({kind}); save the drawing from the app")
    try:
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(head[:NIFTI1_HEADER_BYTES]), check=False)
    except Exception as exc:  # noqa: BLE001 (nibabel raises many types for foreign bytes)
        raise UploadRefused(f"the uploaded mask's header cannot be read ({exc})") from None
    if header["magic"].item() not in (b"n+1", b"ni1"):
        raise UploadRefused("the uploaded mask is not a NIfTI-1 image (no n+1 magic)")
    return header


def check_mask_header(header, case_shape, case_affine):
    """Check a mask header against the case grid before any voxel is read.

    Parameters
    ----------
    header : nibabel.Nifti1Header
    case_shape : tuple of int
    case_affine : (4, 4) ndarray
        The case image's voxel-to-world RAS+ mm.

    Returns
    -------
    dtype : numpy.dtype
        The stored label type, with the header's byte order.
    offset : int
        Bytes from the file start to the first voxel.

    Raises
    ------
    UploadRefused
    """
    dims = [int(n) for n in header["dim"][1:1 + int(header["dim"][0])]] if 0 < int(header["dim"][0]) <= 7 else []
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 3:
        raise UploadRefused(f"the uploaded mask is not a 3D image (dimensions {dims or list(header['dim'])})")
    code = int(header["datatype"])
    if code not in LABEL_DATATYPES:
        name = header.get_data_dtype() if code in nib.nifti1.data_type_codes.code else f"code {code}"
        raise UploadRefused(f"the uploaded mask is stored as {name}, not integer labels: save a 0/1 drawing")
    slope, inter = header.get_slope_inter()
    if (slope is not None and slope != 1) or (inter is not None and inter != 0):
        raise UploadRefused(f"the uploaded mask has intensity scaling (scl_slope {slope}, scl_inter {inter}); "
                            "a mask is plain 0/1 labels")
    try:
        affine = header.get_best_affine()
    except Exception as exc:  # noqa: BLE001 (a quaternion or pixdims nibabel cannot turn into an affine)
        raise UploadRefused(f"the uploaded mask has no usable orientation ({exc})") from None
    if not same_grid(dims, affine, case_shape, case_affine):
        raise UploadRefused(f"the uploaded mask (shape {dims}) is not on the case grid (shape {list(case_shape)}, "
                            "or another position); reload the case and draw again")
    offset = float(header["vox_offset"])
    if not (NIFTI1_MIN_OFFSET <= offset <= NIFTI1_MIN_OFFSET + MAX_EXTENSION_BYTES) or offset != int(offset):
        raise UploadRefused(f"the uploaded mask's data offset ({offset:g} bytes) is not where a mask's data starts "
                            f"({NIFTI1_MIN_OFFSET} to {NIFTI1_MIN_OFFSET + MAX_EXTENSION_BYTES})")
    return header.get_data_dtype(), int(offset)


def mask_from_upload(payload, case_shape, case_affine):
    """The 0/1 mask an upload holds, on the case grid.

    Parameters
    ----------
    payload : bytes
        A NIfTI-1 file, gzip or not (NiiVue's ``saveImage({isSaveDrawing: true})``), at most
        :func:`max_upload_bytes` long.
    case_shape : tuple of int
    case_affine : (4, 4) array_like
        The case image's voxel-to-world RAS+ mm.

    Returns
    -------
    ndarray of bool, shape ``case_shape``
        Non-zero labels, in the case image's array order.

    Raises
    ------
    UploadRefused
        With a message naming the problem.
    """
    _check_length(payload, max_upload_bytes(case_shape))
    header = mask_header(_head(payload))
    dtype, offset = check_mask_header(header, tuple(case_shape), np.asarray(case_affine, float))
    n_voxels = int(np.prod(case_shape))
    size = offset + n_voxels * dtype.itemsize
    raw = _inflate(payload, size) if payload[:2] == _GZIP_MAGIC else payload
    if len(raw) < size:
        raise UploadRefused(f"the uploaded mask holds {max(len(raw) - offset, 0)} bytes of voxels, its header "
                            f"declares {n_voxels * dtype.itemsize}: the file is cut short")
    if len(raw) > size:
        raise UploadRefused("the uploaded mask holds more data than its header declares")
    values = np.frombuffer(raw, dtype=dtype, count=n_voxels, offset=offset).reshape(tuple(case_shape), order="F")
    if values.dtype.kind == "i" and values.size and values.min() < 0:
        raise UploadRefused(f"the uploaded mask holds negative values ({values.min()}); labels are 0 or positive")
    return values != 0
