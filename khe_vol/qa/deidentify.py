"""De-identified case images: the T2 without free text, masks on exactly its grid.

A reader package holds copies of the T2 series with every NIfTI free-text
field blanked and extensions dropped, voxels and geometry bit-identical
(:func:`deidentified_nifti_bytes`), and masks carrying exactly the case
image's header geometry (:func:`mask_like`); :func:`same_grid` decides
whether a mask may be shown on (or saved for) a case.
"""

from __future__ import annotations

import io

import numpy as np

#: NIfTI header fields that hold free text (any of them can carry a name or an id).
HEADER_TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name", "data_type", "unused_str")


def deidentified_nifti_bytes(img):
    """A NIfTI file with the same voxels and geometry, and no free text.

    Parameters
    ----------
    img : nibabel.Nifti1Image or nibabel.Nifti2Image

    Returns
    -------
    bytes
        Uncompressed single-file NIfTI: the original header with its text
        fields (:data:`HEADER_TEXT_FIELDS`) blanked and its extensions
        dropped, followed by the original stored voxel values. Built from
        the header and the *unscaled* stored values, so the data type,
        scl_slope/scl_inter, qform/sform and their codes are exactly the
        original ones (nibabel would otherwise re-derive scaling on save).
    """
    header = img.header.copy()
    for name in HEADER_TEXT_FIELDS:
        if name in header:
            header[name] = b""
    header.extensions.clear()
    # nibabel moves scl_slope/scl_inter from a loaded header into the data
    # proxy; put them back so the stored values mean what they meant.
    header.set_slope_inter(getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0))
    header.set_data_offset(header.single_vox_offset)
    raw = np.asanyarray(img.dataobj.get_unscaled()).astype(header.get_data_dtype(), copy=False)
    buf = io.BytesIO()
    header.write_to(buf)
    buf.write(b"\0" * (int(header.get_data_offset()) - buf.tell()))
    buf.write(raw.tobytes(order="F"))
    return buf.getvalue()


def mask_like(mask, img):
    """A uint8 0/1 mask image with exactly the header geometry of ``img``.

    The qform, sform, their codes and pixdim are copied from the case image,
    so the viewer and any tool put the mask on the same voxels. Text fields
    and extensions are blank.
    """
    header = img.header.copy()
    for name in HEADER_TEXT_FIELDS:
        if name in header:
            header[name] = b""
    header.extensions.clear()
    header.set_data_dtype(np.uint8)
    header["cal_min"], header["cal_max"] = 0, 0
    data = (np.asarray(mask).reshape(img.shape[:3]) != 0).astype(np.uint8)
    out = type(img)(data, None, header=header)
    # Constructing from an array resets scaling; a mask has none.
    out.header.set_slope_inter(1.0, 0.0)
    return out


def same_grid(shape_a, affine_a, shape_b, affine_b, atol_mm=1e-3):
    """Whether two 3D grids are the same voxels in world space.

    Parameters
    ----------
    shape_a, shape_b : sequence of int
    affine_a, affine_b : (4, 4) array_like
        Voxel-to-world RAS+ mm.
    atol_mm : float
        Tolerance on every affine entry, mm (float32 headers round).
    """
    return tuple(shape_a)[:3] == tuple(shape_b)[:3] and np.allclose(
        np.asarray(affine_a, float), np.asarray(affine_b, float), rtol=0, atol=atol_mm
    )
