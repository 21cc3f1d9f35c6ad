"""QC montages: slices through the lesion with the mask contour, as PNG.

Used by the report (one per series, titled with participant and session) and
by the reader packages (one per case, titled with the blinded case code only:
the caller chooses the words, this module adds none that name a person). The
PNG carries no metadata text; identical inputs give identical bytes.

What a montage says, all derived from the affine (never from array axes):

* each tile's plane (axial, coronal, sagittal: the world axis nearest the
  slice normal, "oblique" when it is more than :data:`OBLIQUE_DEG` off) and
  its position, the RAS+ coordinate (mm) of the slice centre along that axis;
* orientation letters on every tile's edges (R/L, A/P, S/I);
* the display convention, in the legend line: **radiological**, the
  patient's right on screen left (and in sagittal tiles anterior on screen
  left), superior or anterior up.

Rendering is split in two so a package renders the slices once per series
and only the title per reader: :func:`montage_tiles` (pure: windowed uint8
slices, contours' masks, labels) and :func:`montage_png`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from nibabel.orientations import io_orientation

#: Slices in a QC montage.
MONTAGE_SLICES = 6
#: A slice normal further than this from its nearest world axis is called oblique (degrees).
OBLIQUE_DEG = 10.0
PLANE_NAMES = ("sagittal", "coronal", "axial")
#: What the legend line says, on every montage.
LEGEND = ("radiological display: patient's right on screen left (sagittal: anterior on screen left), "
          "up = superior/anterior; red line: mask outline; mm: RAS+ position of the slice centre")


def _end_letter(world_axis, positive):
    """Patient direction of the + or - end of a RAS+ world axis (+x = patient's right, as nibabel's R)."""
    return ("LR", "PA", "IS")[world_axis][int(bool(positive))]


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


def display_axes(affine):
    """Array axis -> (world axis, sign) from the affine (nibabel's ``io_orientation``).

    Returns
    -------
    list of (int, int)
        Per array axis, the RAS+ world axis it runs nearest (0 x, 1 y, 2 z)
        and +1 if its index grows toward that axis' + end, else -1. Each world
        axis is used once, also for oblique and 45-degree grids.
    """
    ornt = io_orientation(np.asarray(affine, float))
    return [(int(w), int(s)) for w, s in ornt]


def _display_slice(volume, affine, axis, index):
    """A 2D slice in radiological display, its pixel aspect ratio, and its edge letters.

    Rows run along the in-plane array axis nearest the higher world axis,
    with its + end (anterior or superior) up; columns along the other, with
    its + end on screen **left**: RAS+ +x is the patient's right, so the
    patient's right is on screen left (radiological); in sagittal tiles
    (+y) anterior is on screen left.

    Returns
    -------
    img : ndarray (rows, columns)
    aspect : float
        Row pixel height over column pixel width (imshow's ``aspect``).
    letters : dict
        ``{"left", "right", "top", "bottom"}`` patient directions.
    """
    affine = np.asarray(affine, float)
    axes = display_axes(affine)
    # Basic indexing is a view; np.take copies through a slow generic path.
    plane = volume[(slice(None),) * axis + (index,)]
    in_plane = [a for a in range(3) if a != axis]
    world = [axes[a][0] for a in in_plane]
    signs = [axes[a][1] for a in in_plane]
    # col axis = lower world axis, row axis = higher.
    if world[0] > world[1]:
        plane, in_plane, world, signs = plane.T, in_plane[::-1], world[::-1], signs[::-1]
    img = plane.T  # img[row = in_plane[1] index, column = in_plane[0] index]
    col_world, row_world = world
    if signs[0] > 0:  # the column index grows toward the + end, which belongs on screen left
        img = img[:, ::-1]
    left, right = _end_letter(col_world, True), _end_letter(col_world, False)
    if signs[1] > 0:  # up must be the + end: flip so index 0 is at the bottom
        img = img[::-1, :]
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    aspect = sizes[in_plane[1]] / sizes[in_plane[0]]
    letters = {"left": left, "right": right, "top": _end_letter(row_world, True),
               "bottom": _end_letter(row_world, False)}
    return img, aspect, letters


def slice_position(affine, shape, axis, index):
    """Plane name and RAS+ position (mm) of one slice's centre.

    Parameters
    ----------
    affine : (4, 4) array_like
        Voxel-to-world RAS+ mm.
    shape : tuple of int
        Array shape.
    axis, index : int
        Slice axis and index.

    Returns
    -------
    plane : str
        ``axial``, ``coronal`` or ``sagittal`` by the world axis nearest the
        slice normal; ``oblique axial`` etc. beyond :data:`OBLIQUE_DEG`.
    world_axis : int
        0, 1, 2 for x, y, z.
    position_mm : float
        That world coordinate of the slice's centre voxel.
    """
    affine = np.asarray(affine, float)
    centre = [(n - 1) / 2.0 for n in shape]
    centre[axis] = index
    point = affine[:3, :3] @ np.asarray(centre, float) + affine[:3, 3]
    normal = np.cross(*[affine[:3, a] for a in range(3) if a != axis])
    normal = normal / np.linalg.norm(normal)
    world_axis = int(np.argmax(np.abs(normal)))
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[world_axis])))))
    plane = PLANE_NAMES[world_axis]
    if angle > OBLIQUE_DEG:
        plane = f"oblique {plane}"
    return plane, world_axis, float(point[world_axis])


def position_text(plane, world_axis, position_mm):
    """``"axial S 12.5 mm"``: the plane and the slice centre's side and distance from the origin."""
    letter = _end_letter(world_axis, position_mm >= 0)
    return f"{plane} {letter} {abs(position_mm):.1f} mm"


@dataclass
class MontageTiles:
    """What a montage draws, without its title: windowed slices, masks, labels."""

    images: list  # uint8 (rows, columns): intensities windowed to the 1-99.5th percentile
    masks: list  # bool (rows, columns) or None
    aspects: list
    positions: list  # tile labels, e.g. "axial S 12.5 mm"
    letters: list  # {"left", "right", "top", "bottom"}


def montage_tiles(data, affine, mask):
    """The tiles of a QC montage (pure; see :func:`montage_png`).

    Parameters
    ----------
    data : ndarray, shape (I, J, K)
        T2 intensities.
    affine : (4, 4) array_like
        Voxel-to-world RAS+ mm.
    mask : ndarray of bool/uint8, shape (I, J, K), or None
        Mask to outline; without one the image only.

    Returns
    -------
    MontageTiles
    """
    data = np.asarray(data, dtype=np.float32)
    axis = slice_axis(affine)
    # Tiles in physical order (inferior to superior, posterior to anterior, right to left's
    # reverse: the world axis ascending), whichever way the array runs.
    indices = sorted(montage_slices(mask, axis, shape=data.shape),
                     key=lambda i: slice_position(affine, data.shape, axis, i)[2])
    lo, hi = np.percentile(data, [1.0, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    tiles = MontageTiles([], [], [], [], [])
    for index in indices:
        img, aspect, letters = _display_slice(data, affine, axis, index)
        scaled = np.clip((img - lo) / (hi - lo), 0.0, 1.0)
        tiles.images.append(np.round(scaled * 255).astype(np.uint8))
        m = None if mask is None else _display_slice(np.asarray(mask) != 0, affine, axis, index)[0]
        tiles.masks.append(m if m is not None and m.any() else None)
        tiles.aspects.append(aspect)
        tiles.positions.append(position_text(*slice_position(affine, data.shape, axis, index)))
        tiles.letters.append(letters)
    return tiles


def montage_png(tiles, title=None, lines=()):
    """Render a QC montage to PNG bytes.

    Parameters
    ----------
    tiles : MontageTiles
    title : str, optional
        First line above the tiles (the report: participant and session; a
        reader package: the case code only).
    lines : sequence of str
        Further lines under the title (volume, status, review flags).

    Returns
    -------
    bytes
        PNG (matplotlib Agg, DejaVu Sans) without metadata text chunks;
        identical inputs give identical bytes.
    """
    import matplotlib

    from matplotlib.figure import Figure

    head = [t for t in (title, *lines) if t]
    n = len(tiles.images)
    ncols = max(1, min(3, n))
    nrows = max(1, math.ceil(n / ncols))
    head_in = 0.22 * len(head) + 0.1
    legend_in = 0.3
    width = 3.0 * ncols
    height = 3.0 * nrows + head_in + legend_in
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": 8}):
        fig = Figure(figsize=(width, height), dpi=80, facecolor="black")
        for k, text in enumerate(head):
            # parse_math=False and no wrap (matplotlib's wrap measures words as mathtext): a message or
            # file name with two "$" is text; lines are short (record_montage_text cuts messages).
            fig.text(0.01, 1 - (0.05 + 0.22 * k) / height, text, color="white", ha="left", va="top", parse_math=False,
                     fontsize=10 if k == 0 else 8, fontweight="bold" if k == 0 else "normal")
        fig.text(0.01, 0.08 / height, LEGEND, color="#bbbbbb", ha="left", va="bottom", fontsize=6.5, wrap=True)
        top = 1 - head_in / height
        bottom = legend_in / height
        for k in range(n):
            ax = fig.add_subplot(nrows, ncols, k + 1)
            ax.imshow(tiles.images[k], cmap="gray", vmin=0, vmax=255, aspect=tiles.aspects[k],
                      interpolation="nearest", origin="upper")
            m = tiles.masks[k]
            if m is not None:
                # Explicit pixel-centre coordinates, as imshow uses: contour's own
                # ``origin`` would shift by half a pixel and flip rows a second time.
                ax.contour(np.arange(m.shape[1]), np.arange(m.shape[0]), m.astype(np.float32), levels=[0.5],
                           colors=["#ff3030"], linewidths=1.2)
            ax.set_axis_off()
            style = {"color": "#ffd700", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
            letters = tiles.letters[k]
            ax.text(0.02, 0.5, letters["left"], ha="left", va="center", **style)
            ax.text(0.98, 0.5, letters["right"], ha="right", va="center", **style)
            ax.text(0.5, 0.98, letters["top"], ha="center", va="top", **style)
            ax.text(0.5, 0.02, letters["bottom"], ha="center", va="bottom", **style)
            ax.text(0.02, 0.98, tiles.positions[k], ha="left", va="top", color="white", fontsize=7.5,
                    transform=ax.transAxes, bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})
        fig.subplots_adjust(left=0.01, right=0.99, top=top, bottom=bottom, wspace=0.02, hspace=0.02)
        buf = io.BytesIO()
        # Software=None drops matplotlib's only default text chunk.
        fig.savefig(buf, format="png", facecolor="black", metadata={"Software": None})
    return buf.getvalue()


def qc_montage_png(data, affine, mask, title=None, lines=()):
    """A QC montage of one series: :func:`montage_tiles` then :func:`montage_png`.

    Parameters
    ----------
    data : ndarray, shape (I, J, K)
        T2 intensities.
    affine : (4, 4) array_like
        Voxel-to-world RAS+ mm.
    mask : ndarray of bool/uint8, shape (I, J, K), or None
        Proposed mask; without one the montage shows the image only.
    title, lines : str, sequence of str
        See :func:`montage_png`.

    Returns
    -------
    bytes
        PNG without metadata text chunks; identical inputs give identical bytes.
    """
    return montage_png(montage_tiles(data, affine, mask), title, lines)


def review_line(reasons):
    """``"review: a; b"`` from review reason codes, or ``"review: none"``."""
    return "review: " + ("; ".join(reasons) if reasons else "none")


def record_montage_text(record):
    """Title and lines of the report's montage of one series (it names participant and session).

    Parameters
    ----------
    record : dict
        A per-series record.

    Returns
    -------
    title : str
        ``participant session (month m)``.
    lines : list of str
        Volume with its band and method; status (and ``qa_status``), the
        error message if any; review reason codes (:func:`review_line`).
    """
    from khe_vol.review import series_reasons

    title = f"{record['participant_id']} {record['session_id']} (month {record.get('month')})"
    lines = []
    if record.get("status") == "ok" and record.get("volume_ml") is not None:
        band = ""
        if record.get("volume_low_ml") is not None and record.get("volume_high_ml") is not None:
            band = f" (band {record['volume_low_ml']:.2f}-{record['volume_high_ml']:.2f} mL)"
        lines.append(f"volume {record['volume_ml']:.2f} mL{band}; method {record.get('method')}")
    status = f"status {record.get('status')}"
    if record.get("qa_status"):
        status += f", qa_status {record['qa_status']}"
    if record.get("status") != "ok" and record.get("message"):
        message = str(record["message"])
        status += ": " + (message if len(message) <= 110 else message[:107] + "...")
    lines.append(status)
    lines.append(review_line([r["reason"] for r in series_reasons(record)]))
    return title, lines
