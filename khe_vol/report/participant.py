"""A page per participant for the unblinded core lab: HTML (self-contained) and PDF.

What a site investigator or a data monitoring committee asks for, on one
page: each timepoint's T2 with the final lesion outline, all cut through
**the same anatomical point**, the volume curve with its uncertainty band,
the response categories with their flags, and the blinded reads when there
are any. The page carries participant and session ids: it is written under
``<results>/participants/``, never under ``qa/`` (the reader packages are
built from the series records only, and the blinding audit forbids ids
there).

Same anatomical point: the point is the centroid of the reference session's
lesion (the baseline, or the first session with a lesion), in that
session's RAS+ mm. A follow-up tracked from it carries the rigid
registration the tracking found (``details.registration.fixed_to_moving_ras``:
the follow-up is the fixed image, so it maps follow-up RAS+ -> reference RAS+,
and its inverse carries the reference's plane into the follow-up); the whole plane, not only its centre, is
mapped through it, so every tile shows the same anatomy even when the infant
lay differently. A session without a registration (a reader mask, a seeded
follow-up) is cut at the same scanner coordinates, and its tile says so.
Never array indices: every tile is resampled in physical space.

Display: axial plane of the reference, radiological (patient's right on
screen left, anterior up), as the QC montages.

Pure functions take arrays + affines and rows; :func:`write_participant_page`
does the files (HTML with base64 PNGs, PDF by matplotlib's ``PdfPages``),
reproducibly (no dates, no software text, fixed fonts).
"""

from __future__ import annotations

import base64
import io
import math
import textwrap
from dataclasses import dataclass, field
from html import escape

import numpy as np

from khe_vol.files import NA, tsv_number

#: Side of the square shown around the anatomical point: at least this (mm) ...
MIN_FIELD_MM = 40.0
#: ... and this many times the reference lesion's largest extent.
FIELD_PER_EXTENT = 1.8
#: Pixels per tile side (the field is resampled to this).
TILE_PIXELS = 200
#: Columns of the volume and response tables shown, in order.
VOLUME_FIELDS = ("session_id", "month", "volume_ml", "volume_low_ml", "volume_high_ml", "method", "seed_source",
                 "volume_source", "qa_status", "needs_review", "review_reason", "status", "message")
RESPONSE_FIELDS = ("session_id", "month", "percent_change", "category", "percent_change_low",
                   "percent_change_high", "near_threshold", "needs_review", "review_reason", "status", "message")
READ_FIELDS = ("session_id", "reader", "case_code", "verdict", "n_voxels", "revision", "comment")


@dataclass
class Timepoint:
    """One session of a participant, as the page needs it."""

    session_id: str
    month: object
    data: np.ndarray | None = None  # T2, or None when the image could not be read
    affine: np.ndarray | None = None
    mask: np.ndarray | None = None  # final mask (bool) on the image grid, or None
    reference_to_session: np.ndarray | None = None  # 4x4 RAS+ -> RAS+, None: scanner coordinates
    note: str = ""  # why there is no image or outline
    reads: list = field(default_factory=list)


# ---------------------------------------------------------------- geometry


def centroid_ras_mm(mask, affine):
    """Centre of a mask's voxels in RAS+ mm (``None`` for an empty mask)."""
    ijk = np.argwhere(np.asarray(mask) != 0)
    if not len(ijk):
        return None
    return np.asarray(affine, float)[:3, :3] @ ijk.mean(axis=0) + np.asarray(affine, float)[:3, 3]


def extent_mm(mask, affine):
    """Largest extent (mm) of a mask's voxel centres along x, y or z (0 for fewer than two voxels)."""
    ijk = np.argwhere(np.asarray(mask) != 0)
    if len(ijk) < 2:
        return 0.0
    xyz = ijk @ np.asarray(affine, float)[:3, :3].T
    return float((xyz.max(axis=0) - xyz.min(axis=0)).max())


def axial_plane_ras(centre_ras_mm, side_mm, pixels=TILE_PIXELS):
    """RAS+ points of a square axial plane, laid out for radiological display.

    Parameters
    ----------
    centre_ras_mm : (3,) array_like
        The anatomical point, RAS+ mm.
    side_mm : float
        Side of the square.
    pixels : int
        Pixels per side.

    Returns
    -------
    ndarray, shape (pixels, pixels, 3)
        ``points[row, col]``: row 0 is the most anterior (+y), column 0 the
        patient's rightmost (+x) point: the patient's right on screen left.
    """
    centre = np.asarray(centre_ras_mm, float)
    offsets = (np.arange(pixels) - (pixels - 1) / 2.0) * (side_mm / pixels)
    rows, cols = np.meshgrid(offsets, offsets, indexing="ij")
    points = np.empty((pixels, pixels, 3))
    points[..., 0] = centre[0] - cols  # to screen right = toward the patient's left (-x)
    points[..., 1] = centre[1] - rows  # down = posterior (-y)
    points[..., 2] = centre[2]
    return points


def sample_at_ras(volume, affine, points_ras, order):
    """Values of a volume at RAS+ points (NaN outside the image).

    Parameters
    ----------
    volume : ndarray, shape (I, J, K)
    affine : (4, 4) array_like
        Voxel-to-world RAS+ mm of ``volume``.
    points_ras : ndarray, shape (..., 3)
    order : int
        Interpolation order: 1 for intensities, 0 for masks.

    Returns
    -------
    ndarray of float, shape ``points_ras.shape[:-1]``
    """
    from scipy.ndimage import map_coordinates

    inverse = np.linalg.inv(np.asarray(affine, float))
    flat = np.asarray(points_ras, float).reshape(-1, 3)
    ijk = flat @ inverse[:3, :3].T + inverse[:3, 3]
    values = map_coordinates(np.asarray(volume, np.float32), ijk.T, order=order, mode="constant", cval=np.nan)
    shape = np.asarray(volume.shape)
    outside = np.any((ijk < -0.5) | (ijk > shape - 0.5), axis=1)
    values[outside] = np.nan
    return values.reshape(np.asarray(points_ras).shape[:-1])


def map_points(matrix, points_ras):
    """Apply a 4x4 RAS+ -> RAS+ matrix to points of shape (..., 3) (identity when ``matrix`` is None)."""
    if matrix is None:
        return np.asarray(points_ras, float)
    m = np.asarray(matrix, float)
    return np.asarray(points_ras, float) @ m[:3, :3].T + m[:3, 3]


def _to_root(records, session):
    """``(root session, 4x4 root RAS+ -> session RAS+)`` along the tracking's registrations."""
    matrix, seen = np.eye(4), {session}
    while True:
        record = records.get(session) or {}
        parent = record.get("reference_session_id")
        registration = ((record.get("details") or {}).get("registration") or {}).get("fixed_to_moving_ras")
        if not parent or registration is None or parent in seen or parent not in records:
            return session, matrix
        # The follow-up was the fixed image: the matrix maps session RAS+ -> parent RAS+.
        matrix = matrix @ np.linalg.inv(np.asarray(registration, float))
        seen.add(parent)
        session = parent


def reference_transforms(records, reference_session_id):
    """Per session, the RAS+ -> RAS+ matrix from the reference session, through the tracking's registrations.

    Parameters
    ----------
    records : dict
        ``{session_id: record}``; a tracked record has ``reference_session_id``
        and ``details.registration.fixed_to_moving_ras`` (its own RAS+ -> its
        reference's RAS+: the tracking registers the reference, moving, onto
        the follow-up, fixed).
    reference_session_id : str
        The session whose lesion centre the page cuts through.

    Returns
    -------
    dict
        ``{session_id: 4x4 ndarray or None}``: identity for the reference
        itself; ``None`` when no chain of registrations joins the session
        and the reference (the page then uses scanner coordinates and says so).
    """
    ref_root, ref_matrix = _to_root(records, reference_session_id)
    out = {}
    for session in records:
        root, matrix = _to_root(records, session)
        # reference -> root (inverse of its chain), then root -> session.
        out[session] = matrix @ np.linalg.inv(ref_matrix) if root == ref_root else None
    return out


# ---------------------------------------------------------------- figures


def _tile(ax, tp, plane_ras, side_mm, reference_session_id):
    ax.set_facecolor("black")
    ax.set_xticks([])
    ax.set_yticks([])
    title = f"{tp.session_id} (month {tp.month})"
    if tp.data is None:
        # Wrapped here: matplotlib's wrap would measure words as mathtext, which a "$" in a file name breaks.
        ax.text(0.5, 0.5, textwrap.fill(tp.note or "no image", 38), ha="center", va="center", color="white",
                fontsize=7, parse_math=False, transform=ax.transAxes)
        ax.set_title(title, fontsize=8, parse_math=False)
        return
    points = map_points(tp.reference_to_session, plane_ras)
    img = sample_at_ras(tp.data, tp.affine, points, order=1)
    # The whole image's window, as the QC montages: a plane without lesion is not stretched to its noise.
    lo, hi = np.percentile(np.asarray(tp.data, np.float32), [1.0, 99.5])
    hi = hi if hi > lo else lo + 1.0
    half = side_mm / 2.0
    extent = (-half, half, -half, half)
    ax.imshow(np.nan_to_num(img, nan=lo), cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
    if tp.mask is not None:
        m = sample_at_ras(tp.mask.astype(np.float32), tp.affine, points, order=0)
        m = np.nan_to_num(m, nan=0.0)
        if m.any():
            n = m.shape[0]
            coords = (np.arange(n) - (n - 1) / 2.0) * (side_mm / n)
            ax.contour(coords, -coords, m, levels=[0.5], colors=["#ff3030"], linewidths=1.0)
    for x, y, letter, ha, va in ((-half * 0.95, 0, "R", "left", "center"), (half * 0.95, 0, "L", "right", "center"),
                                 (0, half * 0.95, "A", "center", "top"), (0, -half * 0.95, "P", "center", "bottom")):
        ax.text(x, y, letter, color="#ffd700", fontsize=7, fontweight="bold", ha=ha, va=va)
    ax.set_xlim(-half, half)
    ax.set_ylim(-half, half)
    if tp.session_id == reference_session_id:
        how = "reference session"
    elif tp.reference_to_session is not None:
        how = "registered to the reference (tracking)"
    else:
        how = "scanner coordinates (no registration)"
    ax.set_title(title, fontsize=8, parse_math=False)
    # Notes quote error messages (file names): text, never mathtext.
    ax.set_xlabel(how + (f"\n{textwrap.fill(tp.note, 50)}" if tp.note else ""), fontsize=6.5, parse_math=False)


def tiles_figure(timepoints, centre_ras_mm, side_mm, reference_session_id):
    """Each timepoint's T2 and final outline through the same anatomical point (one row of tiles)."""
    from matplotlib.figure import Figure

    n = max(len(timepoints), 1)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(2.4 * ncols + 0.4, 2.7 * nrows + 0.7), dpi=100, layout="constrained")
    plane = axial_plane_ras(centre_ras_mm, side_mm)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, tp in zip(axes, timepoints):
        _tile(ax, tp, plane, side_mm, reference_session_id)
    for ax in axes[len(timepoints):]:
        ax.set_axis_off()
    c = np.asarray(centre_ras_mm, float)
    fig.suptitle(
        f"Axial {side_mm:.0f} mm field through the {reference_session_id} lesion centre "
        f"(RAS+ {c[0]:.1f}, {c[1]:.1f}, {c[2]:.1f} mm); radiological: patient's right on screen left; "
        "red: final lesion outline", fontsize=7.5, wrap=True)
    return fig




def curve_figure(volume_rows, response_rows):
    """The participant's volume over time with its uncertainty band, categories and flags."""
    from matplotlib.figure import Figure

    from khe_vol.report.figures import CATEGORY_COLORS

    fig = Figure(figsize=(7.0, 3.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    points = sorted((tsv_number(r.get("month")), tsv_number(r.get("volume_ml")), tsv_number(r.get("volume_low_ml")),
                     tsv_number(r.get("volume_high_ml")), r) for r in volume_rows
                    if r.get("status") == "ok" and tsv_number(r.get("month")) is not None
                    and tsv_number(r.get("volume_ml")) is not None)
    if not points:
        ax.text(0.5, 0.5, "no measured volume", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return fig
    months = [p[0] for p in points]
    volumes = [p[1] for p in points]
    low = [p[2] if p[2] is not None else p[1] for p in points]
    high = [p[3] if p[3] is not None else p[1] for p in points]
    ax.fill_between(months, low, high, color="#56B4E9", alpha=0.35, linewidth=0, label="volume band (low - high)")
    ax.plot(months, volumes, color="#0072B2", marker="o", label="volume (mL)")
    flagged = [(p[0], p[1]) for p in points if p[4].get("needs_review") == "1"]
    if flagged:
        ax.plot(*zip(*flagged), linestyle="none", marker="o", markersize=12, markerfacecolor="none",
                markeredgecolor="#D55E00", label="needs review")
    by_month = {tsv_number(r.get("month")): r for r in response_rows}
    for month, volume, *_ in points:
        row = by_month.get(month)
        if row is None or row.get("category") in (None, NA):
            continue
        change = tsv_number(row.get("percent_change"))
        text = row["category"].replace("_", " ") + (f"\n{change:+.0f}%" if change is not None else "")
        if row.get("near_threshold") == "1":
            text += " (near)"
        ax.annotate(text, (month, volume), xytext=(0, 10), textcoords="offset points", ha="center", fontsize=7,
                    color=CATEGORY_COLORS.get(row["category"], "#333333"))
    ax.set_xticks(sorted(set(months)))
    ax.margins(x=0.12)  # room for the category labels of the first and last point
    ax.set_xlabel("months after baseline")
    ax.set_ylabel("lesion volume (mL)")
    ax.set_ylim(bottom=0, top=max(high) * 1.35 + 1e-6)
    ax.grid(True, axis="y", color="#DDDDDD", linewidth=0.6)
    ax.legend(fontsize=7, loc="upper right", frameon=False)
    return fig


# ---------------------------------------------------------------- page


def choose_reference(timepoints):
    """The reference session (first with a lesion outline), its lesion centre (RAS+ mm) and field side (mm).

    Without any outline: the first session with an image, its image centre,
    :data:`MIN_FIELD_MM` doubled. ``(None, None, None)`` without any image.
    """
    for tp in timepoints:
        if tp.data is not None and tp.mask is not None and tp.mask.any():
            side = max(MIN_FIELD_MM, FIELD_PER_EXTENT * extent_mm(tp.mask, tp.affine))
            return tp.session_id, centroid_ras_mm(tp.mask, tp.affine), side
    for tp in timepoints:
        if tp.data is not None:
            centre = np.asarray(tp.affine, float) @ np.append((np.asarray(tp.data.shape) - 1) / 2.0, 1.0)
            return tp.session_id, centre[:3], 2 * MIN_FIELD_MM
    return None, None, None


def _png(fig):
    from khe_vol.report.figures import figure_bytes

    return figure_bytes(fig)


def _html_table(rows, fields):
    head = "".join(f"<th>{escape(f)}</th>" for f in fields)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(r.get(f, NA)))}</td>" for f in fields) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_CSS = ("body{font-family:DejaVu Sans,Arial,sans-serif;font-size:13px;margin:1.5em;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.2em}td,th{border:1px solid #bbb;padding:2px 6px;"
        "font-size:12px;text-align:left}th{background:#eee}.flag{color:#b34700;font-weight:bold}"
        "img{max-width:100%}.note{color:#555}@media print{img{page-break-inside:avoid}}")


def read_rows(timepoints):
    """Rows of the reads table: one per session and reader."""
    return [{"session_id": tp.session_id, **read} for tp in timepoints for read in tp.reads]


def participant_html(participant_id, timepoints, volume_rows, response_rows, tiles_png, curve_png,
                     reference_session_id):
    """The participant's page as one self-contained HTML document (images as base64 PNG).

    Returns
    -------
    str
    """
    flagged = sorted({reason for r in [*volume_rows, *response_rows] if r.get("needs_review") == "1"
                      for reason in str(r.get("review_reason", NA)).split(";") if reason != NA})
    flags = (f"<p class=\"flag\">Needs review: {escape(', '.join(flagged))}</p>" if flagged
             else "<p>No open review flag.</p>")
    reads = read_rows(timepoints)

    def img(payload, alt):
        return f"<img alt=\"{escape(alt)}\" src=\"data:image/png;base64,{base64.b64encode(payload).decode()}\">"

    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{escape(participant_id)}: lesion volume and response</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(participant_id)}</h1>",
        "<p class=\"note\">Unblinded core-lab page (names the participant): not for blinded readers.</p>",
        flags,
        *([("<ul class=\"note\">" + "".join(f"<li>{escape(tp.session_id)}: {escape(tp.note)}</li>"
                                            for tp in timepoints if tp.note) + "</ul>")]
          if any(tp.note for tp in timepoints) else []),
        "<h2>Lesion at each timepoint</h2>",
        img(tiles_png, "each session's T2 with the final lesion outline through the same anatomical point")
        if tiles_png else "<p>No image of this participant could be read.</p>",
        "<h2>Volume over time</h2>", img(curve_png, "lesion volume with its uncertainty band"),
        "<h2>Volumes</h2>", _html_table(volume_rows, VOLUME_FIELDS),
        "<h2>Response</h2>",
        _html_table(response_rows, RESPONSE_FIELDS) if response_rows else "<p>No follow-up.</p>",
    ]
    if reads:
        parts += ["<h2>Blinded reads</h2>", _html_table(reads, READ_FIELDS)]
    if reference_session_id is not None:
        parts.append(f"<p class=\"note\">Reference session for the images: {escape(reference_session_id)}.</p>")
    parts.append("<p class=\"note\">Tables: volumes.tsv and response.tsv (their .json data dictionaries "
                 "define each column).</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _text_page(participant_id, volume_rows, response_rows, reads):
    """A PDF page of the tables, as text (matplotlib)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.69, 8.27), dpi=100)  # A4 landscape
    lines = [f"{participant_id}: volumes", ""]
    for r in volume_rows:
        lines.append(f"{r.get('session_id')}  month {r.get('month')}  {r.get('volume_ml')} mL "
                     f"[{r.get('volume_low_ml')} - {r.get('volume_high_ml')}]  {r.get('status')}  "
                     f"qa {r.get('qa_status')}  review {r.get('review_reason')}")
    lines += ["", "response"]
    for r in response_rows:
        lines.append(f"{r.get('session_id')}  month {r.get('month')}  {r.get('percent_change')}%  "
                     f"{r.get('category')}  near {r.get('near_threshold')}  needs review {r.get('needs_review')} "
                     f"({r.get('review_reason')})  {r.get('status')}")
    if reads:
        lines += ["", "blinded reads"]
        for r in reads:
            lines.append(f"{r.get('session_id')}  {r.get('reader')}  {r.get('verdict')}  {r.get('n_voxels')} voxels  "
                         f"revision {r.get('revision')}  {' '.join(str(r.get('comment') or '').split())[:80]}")
    # Readers' comments and messages are text: two "$" must not start mathtext (which could fail).
    fig.text(0.04, 0.96, "\n".join(lines), ha="left", va="top", fontsize=7.5, family="DejaVu Sans Mono",
             parse_math=False)
    return fig


def participant_pdf(participant_id, volume_rows, response_rows, reads, tiles_fig, curve_fig):
    """The page as PDF bytes: images, curve, tables (no creation date: reruns give the same bytes)."""
    from matplotlib.backends.backend_pdf import PdfPages

    from khe_vol.report.figures import _style

    buf = io.BytesIO()
    with _style():
        with PdfPages(buf, metadata={"CreationDate": None, "Creator": None, "Producer": None,
                                     "Title": f"{participant_id}: lesion volume and response"}) as pdf:
            for fig in (tiles_fig, curve_fig, _text_page(participant_id, volume_rows, response_rows, reads)):
                if fig is not None:
                    pdf.savefig(fig)
    return buf.getvalue()


def participant_page(participant_id, timepoints, volume_rows, response_rows):
    """Build the participant's HTML and PDF.

    Parameters
    ----------
    participant_id : str
    timepoints : list of Timepoint
        In session order.
    volume_rows, response_rows : list of dict
        The participant's rows of ``volumes.tsv`` and ``response.tsv``.

    Returns
    -------
    html : str
    pdf : bytes
    """
    from khe_vol.report.figures import _style

    with _style():
        reference, centre, side = choose_reference(timepoints)
        tiles_fig = tiles_figure(timepoints, centre, side, reference) if reference is not None else None
        curve_fig = curve_figure(volume_rows, response_rows)
        tiles_png = _png(tiles_fig) if tiles_fig is not None else None
        curve_png = _png(curve_fig)
    html = participant_html(participant_id, timepoints, volume_rows, response_rows, tiles_png, curve_png, reference)
    pdf = participant_pdf(participant_id, volume_rows, response_rows, read_rows(timepoints), tiles_fig, curve_fig)
    return html, pdf


# ---------------------------------------------------------------- files


def write_participant_page(participant_id, record_paths, volumes_tsv, response_tsv, derivatives_dir, out_html,
                           out_pdf, final_records=None):
    """Read the participant's tables, records, images and final masks; write the HTML and PDF atomically.

    Parameters
    ----------
    participant_id : str
    record_paths : list of path-like
        The participant's per-series ``record.json`` files (source image,
        tracking registration).
    volumes_tsv, response_tsv : path-like
        The cohort tables (only this participant's rows are used).
    derivatives_dir : path-like
        The derivatives dataset: the final masks (``desc-<reader>`` when a
        reader's edited mask decided the volume).
    out_html, out_pdf : path-like
    final_records : path-like, optional
        The reads' final records (``qa/final_records.json``): their
        ``reads`` are shown.

    Returns
    -------
    list of str
        Problems met (unreadable image or mask), also written on the page.
    """
    from pathlib import Path

    from khe_vol.derivatives import mask_relpath
    from khe_vol.files import atomic_write_bytes, atomic_write_text, read_records, read_tsv
    from khe_vol.nifti import SeriesError, load_image

    volume_rows = [r for r in read_tsv(volumes_tsv) if r["participant_id"] == participant_id]
    response_rows = [r for r in read_tsv(response_tsv) if r["participant_id"] == participant_id]
    records = {r["session_id"]: r for r in read_records(record_paths) if r["participant_id"] == participant_id}
    finals = {}
    if final_records:
        finals = {r["session_id"]: r for r in read_records([final_records]) if r["participant_id"] == participant_id}
    by_session = {r["session_id"]: r for r in volume_rows}
    order = sorted(records, key=lambda sid: (tsv_number(by_session.get(sid, {}).get("month")) or 0.0, sid))
    problems = []
    timepoints = []
    for sid in order:
        rec = records[sid]
        row = by_session.get(sid, {})
        tp = Timepoint(sid, row.get("month", rec.get("month")))
        try:
            image = load_image(rec["source_file"], "series")
            tp.data, tp.affine = image.data, image.affine
        except (SeriesError, TypeError, KeyError) as exc:
            tp.note = f"no image: {exc}" if rec.get("source_file") else "no image"
            problems.append(f"{participant_id} {sid}: {tp.note}")
        source = str(row.get("volume_source") or "")
        reader = source.split(":", 1)[0] if source.endswith(":edited") else None
        mask_file = Path(derivatives_dir) / mask_relpath(participant_id, sid, reader)
        if tp.data is not None and row.get("status") == "ok":
            if source.endswith(":no_residual_lesion"):
                tp.mask = np.zeros(tp.data.shape, bool)
                tp.note = "reader: no residual lesion"
            elif mask_file.is_file():
                try:
                    mask = load_image(mask_file, "mask")
                except SeriesError as exc:
                    tp.note = f"no outline: {exc}"
                    problems.append(f"{participant_id} {sid}: {tp.note}")
                else:
                    if mask.data.shape == tp.data.shape and np.allclose(mask.affine, tp.affine, atol=1e-4):
                        tp.mask = mask.data != 0
                    else:
                        tp.note = "no outline: the final mask is not on the image grid"
                        problems.append(f"{participant_id} {sid}: {tp.note}")
        elif tp.data is not None:
            tp.note = f"no final volume ({row.get('status', 'no row')})"
        reads = (finals.get(sid) or {}).get("reads") or {}
        tp.reads = [{"reader": reader_id, **{k: read.get(k) for k in READ_FIELDS[2:]}}
                    for reader_id, read in sorted(reads.items())]
        timepoints.append(tp)
    reference, _, _ = choose_reference(timepoints)
    transforms = reference_transforms(records, reference) if reference is not None else {}
    for tp in timepoints:
        tp.reference_to_session = transforms.get(tp.session_id)
    html, pdf = participant_page(participant_id, timepoints, volume_rows, response_rows)
    atomic_write_text(out_html, html)
    atomic_write_bytes(out_pdf, pdf)
    return problems
