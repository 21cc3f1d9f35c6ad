"""QC montages: slices through the lesion with the mask contour, as PNG.

Used by the reader packages (one per case) and by the report (one per
series). No text is drawn and the PNG carries no metadata text, so a montage
can be shown to a blinded reader; identical inputs give identical bytes.
"""

from __future__ import annotations

import io
import math

import numpy as np

#: Slices in a QC montage.
MONTAGE_SLICES = 6


def slice_axis(affine):
    """Array axis with the largest voxel edge (the slice direction of a 2D acquisition)."""
    return int(np.argmax(np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)))


def montage_slices(mask, axis, n=MONTAGE_SLICES, shape=None):
    """Slice indices along ``axis`` spread over the lesion's extent.

    With an empty or missing mask the slices spread over the middle 80 % of
    the volume instead, so a reader still sees where the image is.
    """
    if mask is not None and np.any(mask):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(np.any(mask, axis=other))
        lo, hi = int(present[0]), int(present[-1])
    else:
        size = (shape if shape is not None else mask.shape)[axis]
        lo, hi = round(0.1 * (size - 1)), round(0.9 * (size - 1))
    count = min(n, hi - lo + 1)
    return sorted({round(float(v)) for v in np.linspace(lo, hi, count)})


def _display_slice(volume, affine, axis, index):
    """A 2D slice oriented for display, and its pixel aspect ratio.

    Rows run along the in-plane array axis closest to the higher world axis
    (up = anterior or superior), columns along the other (x to the right, as
    NiiVue's default neurological view).
    """
    affine = np.asarray(affine, float)
    # Basic indexing is a view; np.take copies through a slow generic path.
    plane = volume[(slice(None),) * axis + (index,)]
    in_plane = [a for a in range(3) if a != axis]
    world_axis = [int(np.argmax(np.abs(affine[:3, a]))) for a in in_plane]
    # col axis = lower world axis, row axis = higher.
    if world_axis[0] > world_axis[1]:
        plane, in_plane, world_axis = plane.T, in_plane[::-1], world_axis[::-1]
    # Now plane[col_index, row_index]; show rows as image rows.
    img = plane.T
    if affine[world_axis[0], in_plane[0]] < 0:
        img = img[:, ::-1]
    if affine[world_axis[1], in_plane[1]] > 0:  # up must be +world: flip so index 0 is at the bottom
        img = img[::-1, :]
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    aspect = sizes[in_plane[1]] / sizes[in_plane[0]]
    return img, aspect


def qc_montage_png(data, affine, mask):
    """A QC montage: slices through the lesion with the mask contour, no text.

    Parameters
    ----------
    data : ndarray, shape (I, J, K)
        T2 intensities.
    affine : (4, 4) array_like
        Voxel-to-world RAS+ mm.
    mask : ndarray of bool/uint8, shape (I, J, K), or None
        Proposed mask; without one the montage shows the image only.

    Returns
    -------
    bytes
        PNG (matplotlib Agg) without metadata text chunks; identical inputs
        give identical bytes.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    data = np.asarray(data, dtype=np.float32)
    axis = slice_axis(affine)
    indices = montage_slices(mask, axis, shape=data.shape)
    lo, hi = np.percentile(data, [1.0, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    ncols = min(3, len(indices))
    nrows = math.ceil(len(indices) / ncols)
    fig = Figure(figsize=(3.0 * ncols, 3.0 * nrows), dpi=80, facecolor="black")
    for n, index in enumerate(indices):
        ax = fig.add_subplot(nrows, ncols, n + 1)
        img, aspect = _display_slice(data, affine, axis, index)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest", origin="upper")
        m = None if mask is None else _display_slice(mask, affine, axis, index)[0]
        if m is not None and m.any():
            m = m.astype(np.float32)
            # Explicit pixel-centre coordinates, as imshow uses: contour's own
            # ``origin`` would shift by half a pixel and flip rows a second time.
            ax.contour(np.arange(m.shape[1]), np.arange(m.shape[0]), m, levels=[0.5], colors=["#ff3030"],
                       linewidths=1.2)
        ax.set_axis_off()
    fig.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.01, wspace=0.02, hspace=0.02)
    buf = io.BytesIO()
    # Software=None drops matplotlib's only default text chunk.
    fig.savefig(buf, format="png", facecolor="black", metadata={"Software": None})
    return buf.getvalue()
