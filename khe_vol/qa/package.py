"""The blinded reader package: de-identified cases named only by random-looking codes.

For each reader, ``R/qa/<reader>/`` gets a ``worklist.json`` and, per case,
a de-identified copy of the T2 series, the proposed (automatic) mask and a QC
montage, all named only by the case code. The unblinding key goes to
``R/blinding/key.tsv``, outside ``qa/``.

Case codes are HMAC-SHA256(seed, ``reader|participant|session``) written in
Crockford base32: deterministic (a rebuild gives the same codes and bytes),
different per reader (two readers cannot line their worklists up), and
impossible to invert without the seed. The seed therefore goes only into the
key: a reader who knew it could compute the code of any participant. Use a
large random seed (``python -c "import secrets; print(secrets.randbits(63))"``);
a small one could be found by trying them all.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import hmac
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from khe_vol.nifti import (
    SeriesError,
    atomic_write_bytes,
    atomic_write_text,
    load_image,
    nifti_bytes,
    open_image,
    sha256_file,
)
from khe_vol.qa import VERDICTS, WORKLIST_NAME, check_reader_id, key_dir, reader_dir
from khe_vol.review import series_reasons
from khe_vol.tables import read_tsv

#: Crockford base32 (no I, L, O, U): no look-alike characters for readers to mistype.
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: A code starts with a letter, so it is never a number or a date.
CODE_LETTERS = CODE_ALPHABET[10:]
#: 10 characters = 49 bits: collisions are negligible for any trial, and still checked.
CODE_LENGTH = 10

#: NIfTI header fields that hold free text (any of them can carry a name or an id).
HEADER_TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name", "data_type", "unused_str")

#: Slices in a QC montage.
MONTAGE_SLICES = 6

#: Columns of ``R/blinding/key.tsv`` and what they mean (also written as key.json).
KEY_COLUMNS = {
    "reader": "reader id the case was packaged for",
    "position": "1-based position of the case in that reader's worklist (n/a: no case)",
    "case_code": "code the reader sees (n/a: no case was made for this series)",
    "participant_id": "BIDS participant (sub-...)",
    "session_id": "BIDS session (ses-...)",
    "status": "case (packaged) or no_case (the series could not be packaged; see message)",
    "has_proposed_mask": "yes if the reader was shown an automatic mask, no if they must draw one",
    "automatic_volume_ml": "volume of the proposed mask shown to the reader, mL (n/a: none)",
    "record_path": "the series record the case was built from",
    "record_sha256": "SHA-256 of that record file",
    "source_file": "the original T2 series",
    "source_sha256": "SHA-256 of the original T2 series",
    "proposed_mask_sha256": "SHA-256 of the proposed mask file in the reader package (n/a: none); "
    "a read whose proposed_mask_sha256 differs was made on another mask (stale)",
    "overlays": "adjudication overlays shown, as label=reader;... (n/a: none)",
    "seed": "secret seed of the codes and the order (never shown to readers)",
    "message": "why no case was made, or why no proposed mask was shown (n/a: nothing to say)",
}

#: Columns of an ``--overlays`` TSV (one row per other reader's read of a series).
OVERLAY_COLUMNS = ("participant_id", "session_id", "reader", "verdict", "volume_ml", "mask")

NA = "n/a"


class PackageError(ValueError):
    """The package cannot be built as asked; the message says why."""


# --------------------------------------------------------------------------
# Pure pieces: codes, order, de-identified images, montage, worklist.
# --------------------------------------------------------------------------


def _hmac_int(seed, message):
    key = str(int(seed)).encode("ascii")
    return int.from_bytes(hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest(), "big")


def case_code(seed, reader, participant_id, session_id):
    """The code a reader sees for one series.

    Parameters
    ----------
    seed : int
        Secret seed of the package (non-negative).
    reader, participant_id, session_id : str

    Returns
    -------
    str
        ``CODE_LENGTH`` Crockford base32 characters, first one a letter. A
        single unbroken run of letters and digits, so the leak audit's
        whole-word matching can never find a short id *inside* a code.
    """
    n = _hmac_int(seed, f"{reader}|{participant_id}|{session_id}")
    chars = [CODE_LETTERS[n % len(CODE_LETTERS)]]
    n //= len(CODE_LETTERS)
    for _ in range(CODE_LENGTH - 1):
        chars.append(CODE_ALPHABET[n % len(CODE_ALPHABET)])
        n //= len(CODE_ALPHABET)
    return "".join(chars)


def reader_int(reader):
    """A stable 64-bit integer from a reader id (for seeding that reader's shuffle)."""
    return int.from_bytes(hashlib.sha256(reader.encode("utf-8")).digest()[:8], "big")


def reader_order(n_cases, seed, reader):
    """Permutation giving a reader's worklist order.

    Returns
    -------
    ndarray of int, shape (n_cases,)
        ``order[p]`` is the index (in participant/session sort order) of the
        case shown at position ``p``; from ``numpy.random.default_rng([seed,
        reader_int(reader)])``, so each reader gets a different, reproducible order.
    """
    return np.random.default_rng([int(seed), reader_int(reader)]).permutation(n_cases)


def overlay_labels(seed, reader, participant_id, session_id, other_readers):
    """Blinded labels for other readers' masks shown to an adjudicator.

    The assignment of "Reader A", "Reader B", ... is shuffled per case (from
    the seed), so the adjudicator cannot learn which label is which reader
    across cases.

    Returns
    -------
    dict
        original reader id -> label.
    """
    readers = sorted(other_readers)
    rng = np.random.default_rng([int(seed), _hmac_int(seed, f"overlay|{reader}|{participant_id}|{session_id}") % 2**63])
    shuffled = [readers[i] for i in rng.permutation(len(readers))]
    return {r: f"Reader {chr(ord('A') + i)}" for i, r in enumerate(shuffled)}


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


def build_worklist(cases, reader, seed):
    """A reader's worklist: codes and order, from the cases to package.

    Parameters
    ----------
    cases : list of dict
        One per packaged series, in participant/session order, with keys
        ``participant_id``, ``session_id``, ``automatic_volume_ml`` (float or
        None), ``has_proposed_mask`` (bool), ``overlays`` (list of dicts
        with ``reader``, ``verdict``, ``volume_ml``, ``has_mask``; may be empty)
        and optionally ``review_reasons`` (review reason codes, see
        :mod:`khe_vol.review`): cases with reasons come first, each group in
        the reader's own shuffled order.
    reader : str
    seed : int

    Returns
    -------
    worklist : dict
        What ``worklist.json`` holds (nothing identifying: codes, file names,
        volumes, overlay labels).
    placement : list of dict
        Per entry of ``cases`` (same order): ``case_code``, ``position``
        (1-based) and ``overlay_labels`` (reader id -> label), for the key.

    Raises
    ------
    PackageError
        If two cases would get the same code.
    """
    codes = [case_code(seed, reader, c["participant_id"], c["session_id"]) for c in cases]
    if len(set(codes)) != len(codes):
        raise PackageError(f"two cases of reader {reader} got the same code; choose another seed")
    shuffled = reader_order(len(cases), seed, reader)
    order = [i for i in shuffled if cases[i].get("review_reasons")] + [
        i for i in shuffled if not cases[i].get("review_reasons")]
    placement = [None] * len(cases)
    entries = []
    for position, index in enumerate(order, start=1):
        c, code = cases[index], codes[index]
        labels = overlay_labels(seed, reader, c["participant_id"], c["session_id"],
                                [o["reader"] for o in c.get("overlays", [])])
        overlays = []
        for o in sorted(c.get("overlays", []), key=lambda o: labels[o["reader"]]):
            label = labels[o["reader"]]
            overlays.append({
                "label": label,
                "verdict": o["verdict"],
                "volume_ml": o["volume_ml"],
                "mask": f"{code}_{_label_slug(label)}_mask.nii.gz" if o["has_mask"] else None,
            })
        entries.append({
            "position": position,
            "case_code": code,
            "image": f"{code}_t2.nii.gz",
            "proposed_mask": f"{code}_mask.nii.gz" if c["has_proposed_mask"] else None,
            "has_proposed_mask": bool(c["has_proposed_mask"]),
            "automatic_volume_ml": _round_ml(c["automatic_volume_ml"]),
            "qc_montage": f"{code}_qc.png",
            "overlays": overlays,
            "review_reasons": list(c.get("review_reasons", [])),
        })
        placement[index] = {"case_code": code, "position": position, "overlay_labels": labels}
    worklist = {
        "format": "khe-vol reader worklist 1",
        "reader": reader,
        "n_cases": len(entries),
        "verdicts": list(VERDICTS),
        "cases": entries,
    }
    return worklist, placement


def _label_slug(label):
    return label.lower().replace(" ", "-")


def _round_ml(value):
    return None if value is None else round(float(value), 3)


# --------------------------------------------------------------------------
# I/O: reading records and inputs, writing the package and the key.
# --------------------------------------------------------------------------


@dataclass
class _Series:
    """One series from a record, ready to be packaged (or why not)."""

    record_path: Path
    record: dict
    record_sha256: str
    problem: str | None = None
    note: str | None = None
    t2_bytes: bytes | None = None
    mask_bytes: bytes | None = None
    png_bytes: bytes | None = None
    overlays: list = field(default_factory=list)

    @property
    def ids(self):
        return self.record["participant_id"], self.record["session_id"]


def _tsv_text(columns, rows):
    """TSV text; tabs and line breaks inside values become spaces (plain TSV, no quoting)."""
    def cell(value):
        return NA if value is None else " ".join(str(value).split("\t")).replace("\r", " ").replace("\n", " ")

    lines = ["\t".join(columns)] + ["\t".join(cell(row.get(c)) for c in columns) for row in rows]
    return "\n".join(lines) + "\n"


def _resolve(path, source_root):
    path = Path(path)
    return path if path.is_absolute() or source_root is None else Path(source_root) / path


def _prepare_series(record_path, source_root, overlays):
    record_path = Path(record_path)
    record = json.loads(record_path.read_text(encoding="utf-8"))
    s = _Series(record_path, record, sha256_file(record_path))
    if not record.get("source_file"):
        s.problem = f"{record_path}: the record names no source image ({record.get('message') or 'no message'})"
        return s
    source = _resolve(record["source_file"], source_root)
    try:
        image = load_image(source, "series")
        img, _, _, _ = open_image(source, "series")
    except SeriesError as exc:
        s.problem = str(exc)
        return s
    if record.get("source_sha256") and record["source_sha256"] != image.sha256:
        s.problem = f"{source}: the file changed since it was measured (SHA-256 differs from {record_path})"
        return s
    mask = None
    mask_path = record_path.with_name("mask.nii.gz")
    if record.get("status") == "ok":
        try:
            loaded = load_image(mask_path, "mask")
        except SeriesError as exc:
            s.note = f"no proposed mask: {exc}"
        else:
            if same_grid(loaded.data.shape, loaded.affine, image.data.shape, image.affine):
                mask = loaded.data != 0
            else:
                s.note = f"no proposed mask: {mask_path} is not on the grid of {source}"
    else:
        s.note = f"no proposed mask: the series record is an error ({record.get('message')})"
    # Same gzip settings as nifti.nifti_bytes (mtime 0, no file name): reproducible.
    s.t2_bytes = gzip.compress(deidentified_nifti_bytes(img), compresslevel=6, mtime=0)
    if mask is not None:
        s.mask_bytes = nifti_bytes(mask_like(mask, img))
    s.png_bytes = qc_montage_png(image.data, image.affine, mask)
    for o in overlays:
        s.overlays.append(_prepare_overlay(o, img, image, source))
    return s


def _prepare_overlay(row, img, image, source):
    verdict = row["verdict"]
    if verdict not in VERDICTS:
        raise PackageError(f"overlay for {row['participant_id']} {row['session_id']}: verdict {verdict!r} "
                           f"is not one of {', '.join(VERDICTS)}")
    volume = None if row.get("volume_ml") in (None, "", NA) else float(row["volume_ml"])
    mask_bytes = None
    if row.get("mask") not in (None, "", NA):
        loaded = load_image(row["mask"], "mask")
        if not same_grid(loaded.data.shape, loaded.affine, image.data.shape, image.affine):
            raise PackageError(f"{row['mask']}: overlay mask is not on the grid of {source}")
        mask_bytes = nifti_bytes(mask_like(loaded.data != 0, img))
    return {"reader": row["reader"], "verdict": verdict, "volume_ml": volume, "mask_bytes": mask_bytes}


def _series_subset(path):
    """Series listed in a TSV; a header with no rows is an empty list (nothing to adjudicate)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = list(reader)
        columns = set(reader.fieldnames or ())
    if not {"participant_id", "session_id"} <= columns:
        raise PackageError(f"{path}: needs columns participant_id and session_id")
    return {(r["participant_id"], r["session_id"]) for r in rows}


def _overlay_rows(path):
    rows = read_tsv(path)
    if rows and not set(OVERLAY_COLUMNS) <= set(rows[0]):
        raise PackageError(f"{path}: needs columns {', '.join(OVERLAY_COLUMNS)}")
    by_series = {}
    for r in rows:
        by_series.setdefault((r["participant_id"], r["session_id"]), []).append(r)
    for key, group in by_series.items():
        readers = [r["reader"] for r in group]
        if len(set(readers)) != len(readers):
            raise PackageError(f"{path}: reader listed twice for {key[0]} {key[1]}")
    return by_series


def write_package(results_dir, readers, seed, record_paths, series_tsv=None, overlays_tsv=None, source_root=None,
                  key_path=None):
    """Build the reader packages and the unblinding key.

    Parameters
    ----------
    results_dir : path-like
        ``R``: packages go to ``R/qa/<reader>/``, the key to ``R/blinding/``.
    readers : list of str
    seed : int
        Secret, non-negative.
    record_paths : list of path-like
        ``record.json`` files of the workflow (``mask.nii.gz`` beside each).
    series_tsv : path-like, optional
        Only package these ``participant_id``/``session_id`` pairs (adjudication).
    overlays_tsv : path-like, optional
        Other readers' reads to show as labelled overlays (:data:`OVERLAY_COLUMNS`;
        ``mask`` a NIfTI on the series grid or n/a).
    source_root : path-like, optional
        Directory that relative ``source_file`` paths in records are relative to
        (default: the current directory).
    key_path : path-like, optional
        The key TSV (default ``R/blinding/key.tsv``; its data dictionary goes
        beside it as ``.json``). Refused under ``R/qa/``.

    Returns
    -------
    list of dict
        The key rows written (all readers of this call).
    """
    readers = [check_reader_id(r) for r in readers]
    key_path = Path(key_path) if key_path else default_key_path(results_dir)
    qa_root = (Path(results_dir) / "qa").resolve()
    if qa_root == key_path.resolve().parent or qa_root in key_path.resolve().parents:
        raise PackageError(f"{key_path}: the unblinding key must not be inside {qa_root}")
    if len(set(readers)) != len(readers):
        raise PackageError("a reader is listed twice")
    seed = int(seed)
    if seed < 0:
        raise PackageError("the seed must be a non-negative integer")
    wanted = _series_subset(series_tsv) if series_tsv else None
    overlay_rows = _overlay_rows(overlays_tsv) if overlays_tsv else {}

    records = []
    for p in record_paths:
        rec = json.loads(Path(p).read_text(encoding="utf-8"))
        key = (rec["participant_id"], rec["session_id"])
        if wanted is None or key in wanted:
            records.append((key, Path(p)))
    records.sort(key=lambda kp: kp[0])
    keys = [k for k, _ in records]
    if len(set(keys)) != len(keys):
        raise PackageError("two records are for the same participant and session")
    if wanted is not None and wanted - set(keys):
        missing = ", ".join(f"{a} {b}" for a, b in sorted(wanted - set(keys)))
        raise PackageError(f"{series_tsv}: no record given for {missing}")
    if set(overlay_rows) - set(keys):
        missing = ", ".join(f"{a} {b}" for a, b in sorted(set(overlay_rows) - set(keys)))
        raise PackageError(f"{overlays_tsv}: overlays for series not being packaged: {missing}")

    prepared = [_prepare_series(p, source_root, overlay_rows.get(k, [])) for k, p in records]
    packaged = [s for s in prepared if s.problem is None]
    key_rows = []
    for reader in readers:
        cases = [{
            "participant_id": s.ids[0],
            "session_id": s.ids[1],
            "automatic_volume_ml": s.record.get("volume_ml") if s.mask_bytes is not None else None,
            "has_proposed_mask": s.mask_bytes is not None,
            # Codes only: a reason's detail text may name a session.
            "review_reasons": [r["reason"] for r in series_reasons(s.record)],
            "overlays": [{"reader": o["reader"], "verdict": o["verdict"], "volume_ml": o["volume_ml"],
                          "has_mask": o["mask_bytes"] is not None} for o in s.overlays],
        } for s in packaged]
        worklist, placement = build_worklist(cases, reader, seed)
        files = {WORKLIST_NAME: (json.dumps(worklist, indent=2, sort_keys=True) + "\n").encode("utf-8")}
        by_code = {c["case_code"]: c for c in worklist["cases"]}
        for s, place in zip(packaged, placement):
            entry = by_code[place["case_code"]]
            files[entry["image"]] = s.t2_bytes
            files[entry["qc_montage"]] = s.png_bytes
            if entry["proposed_mask"]:
                files[entry["proposed_mask"]] = s.mask_bytes
            for o in s.overlays:
                label = place["overlay_labels"][o["reader"]]
                ov = next(e for e in entry["overlays"] if e["label"] == label)
                if ov["mask"]:
                    files[ov["mask"]] = o["mask_bytes"]
        _write_reader_dir(reader_dir(results_dir, reader), files)
        placed = {s.ids: (s, pl) for s, pl in zip(packaged, placement)}
        for s in prepared:
            row = _key_row(reader, s, seed, placed.get(s.ids), files)
            key_rows.append(row)
    _write_key(key_path, readers, key_rows)
    return key_rows


def _key_row(reader, s, seed, placed, files):
    rec = s.record
    row = {
        "reader": reader,
        "participant_id": rec["participant_id"],
        "session_id": rec["session_id"],
        "record_path": str(s.record_path),
        "record_sha256": s.record_sha256,
        "source_file": rec.get("source_file"),
        "source_sha256": rec.get("source_sha256"),
        "seed": str(seed),
        "message": s.problem or s.note,
    }
    if placed is None:
        row.update(status="no_case", has_proposed_mask="no")
        return row
    _, place = placed
    code = place["case_code"]
    mask_name = f"{code}_mask.nii.gz"
    row.update(
        status="case",
        case_code=code,
        position=str(place["position"]),
        has_proposed_mask="yes" if mask_name in files else "no",
        automatic_volume_ml=None if mask_name not in files or rec.get("volume_ml") is None
        else f"{float(rec['volume_ml']):.3f}",
        proposed_mask_sha256=hashlib.sha256(files[mask_name]).hexdigest() if mask_name in files else None,
        overlays=";".join(f"{label}={r}" for r, label in sorted(place["overlay_labels"].items(),
                                                                 key=lambda kv: kv[1])) or None,
    )
    return row


def _write_reader_dir(directory, files):
    """Write a reader's files atomically and remove any file not in this build."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, payload in sorted(files.items()):
        target = directory / name
        if target.is_file() and target.read_bytes() == payload:
            continue  # unchanged: keep its mtime too
        atomic_write_bytes(target, payload)
    for path in sorted(directory.iterdir()):
        if path.name not in files:
            if path.is_dir():
                raise PackageError(f"{path}: unexpected folder in a reader package; remove it")
            path.unlink()


def default_key_path(results_dir):
    """``R/blinding/key.tsv``."""
    return key_dir(results_dir) / "key.tsv"


def _write_key(path, readers, rows):
    """Write the key TSV (+ .json dictionary), keeping the rows of readers not rebuilt now."""
    path = Path(path)
    kept = [r for r in read_tsv(path) if r["reader"] not in readers] if path.is_file() else []
    kept = [{c: (None if r.get(c) in (None, NA) else r[c]) for c in KEY_COLUMNS} for r in kept]
    all_rows = kept + rows

    def sort_key(r):
        pos = r.get("position")
        return (r["reader"], pos is None, int(pos) if pos else 0, r["participant_id"], r["session_id"])

    atomic_write_text(path, _tsv_text(KEY_COLUMNS, sorted(all_rows, key=sort_key)))
    atomic_write_text(path.with_suffix(".json"), json.dumps(
        {c: {"Description": d} for c, d in KEY_COLUMNS.items()}, indent=2) + "\n")


def is_key_file(path):
    """Whether a file is an unblinding key written by :func:`write_package` (by its header line)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().rstrip("\n") == "\t".join(KEY_COLUMNS)
    except (OSError, UnicodeDecodeError):
        return False


def key_paths(results_dir):
    """Every key TSV in ``R/blinding/`` (the main one and e.g. an adjudication key)."""
    folder = key_dir(results_dir)
    return sorted(p for p in folder.glob("*.tsv") if is_key_file(p)) if folder.is_dir() else []


def read_key(results_dir, paths=None):
    """Rows of the unblinding key(s) (n/a as None).

    Parameters
    ----------
    results_dir : path-like
    paths : list of path-like, optional
        Key files (default: every key in ``R/blinding/``).
    """
    rows = []
    for path in paths or key_paths(results_dir):
        rows += [{k: (None if v == NA else v) for k, v in r.items()} for r in read_tsv(path)]
    return rows


def main(args):
    """``khe-vol qa package``."""
    import sys

    try:
        rows = write_package(args.results_dir, args.reader, args.seed, args.records, series_tsv=args.series,
                             overlays_tsv=args.overlays, source_root=args.source_root, key_path=args.key)
    except (PackageError, SeriesError, OSError, KeyError, json.JSONDecodeError) as exc:
        print(f"khe-vol qa package: {exc}", file=sys.stderr)
        return 2
    for reader in args.reader:
        n_case = sum(1 for r in rows if r["reader"] == reader and r["status"] == "case")
        n_none = sum(1 for r in rows if r["reader"] == reader and r["status"] != "case")
        print(f"{reader}: {n_case} case(s) in {reader_dir(args.results_dir, reader)}"
              + (f"; {n_none} series not packaged (see the key)" if n_none else ""))
    for r in rows:
        if r["status"] != "case" and r["reader"] == args.reader[0]:
            print(f"  not packaged: {r['message']}", file=sys.stderr)
    print(f"unblinding key: {args.key or default_key_path(args.results_dir)} (keep it away from readers)")
    if args.seed < 2**32:
        print("note: a small seed can be guessed; use e.g. python -c 'import secrets; print(secrets.randbits(63))'",
              file=sys.stderr)
    return 0
