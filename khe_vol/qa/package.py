"""The blinded reader package: de-identified cases named only by random-looking codes.

For each reader, ``R/qa/<reader>/`` gets a ``worklist.json`` and, per case,
a de-identified copy of the T2 series (:mod:`khe_vol.qa.deidentify`), the
proposed (automatic) mask and a QC montage (:mod:`khe_vol.report.montage`),
all named only by the case code (:mod:`khe_vol.qa.codes`). The unblinding key
goes to ``R/blinding/key.tsv``, outside ``qa/`` (:mod:`khe_vol.qa.key`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from khe_vol.files import NA, atomic_write_bytes, mask_beside, read_tsv, read_tsv_table, sha256_file
from khe_vol.nifti import SeriesError, load_image, nifti_bytes, open_image
from khe_vol.qa import (DEFAULT_READER_DISPLAY, OVERLAY_COLUMNS, READING_MODES, VERDICTS, WORKLIST_NAME,
                        check_reader_id, reader_dir)
from khe_vol.qa.codes import case_code, overlay_labels, participant_code, reader_order
from khe_vol.qa.deidentify import deidentified_nifti_bytes, mask_like, same_grid
from khe_vol.qa.key import default_key_path, write_key
from khe_vol.report.montage import montage_png, montage_tiles, review_line
from khe_vol.review import series_reasons

class PackageError(ValueError):
    """The package cannot be built as asked; the message says why."""


def build_worklist(cases, reader, seed, reading_mode="independent"):
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
        the reader's own shuffled order; and ``needs_seed`` (bool): a baseline
        with no seed and no mask, which the reader seeds by clicking; and
        ``month`` (int or None): the time order of a participant's cases in
        longitudinal reading (ties and None by session id).
    reader : str
    seed : int
    reading_mode : {"independent", "longitudinal"}
        ``independent``: the cases in the reader's shuffled order, nothing
        relating them. ``longitudinal``: each participant's cases together,
        in time order, as T1..Tn under a participant code
        (:func:`~khe_vol.qa.codes.participant_code`); participants in the
        reader's shuffled order (those with a case needing review first).
        Each entry then also has ``participant``, ``timepoint`` (1-based),
        ``n_timepoints`` and ``prior_case`` (the code of T1, shown beside
        every later timepoint: the response is measured against the
        baseline; None for T1), and the worklist a ``participants`` list.
        No month, interval, date or session label is written.

    Returns
    -------
    worklist : dict
        What ``worklist.json`` holds (nothing identifying: codes, file names,
        volumes, overlay labels).
    placement : list of dict
        Per entry of ``cases`` (same order): ``case_code``, ``position``
        (1-based) and ``overlay_labels`` (reader id -> label), for the key;
        in longitudinal reading also ``participant_code`` and ``timepoint``.

    Raises
    ------
    PackageError
        If two cases (or, longitudinal, two participants) would get the same code,
        or the reading mode is unknown.
    """
    if reading_mode not in READING_MODES:
        raise PackageError(f"reading mode {reading_mode!r} is not one of {', '.join(READING_MODES)}")
    codes = [case_code(seed, reader, c["participant_id"], c["session_id"]) for c in cases]
    if len(set(codes)) != len(codes):
        raise PackageError(f"two cases of reader {reader} got the same code; choose another seed")
    if reading_mode == "longitudinal":
        order, timepoints = _longitudinal_order(cases, reader, seed)
    else:
        shuffled = reader_order(len(cases), seed, reader)
        order = [i for i in shuffled if cases[i].get("review_reasons")] + [
            i for i in shuffled if not cases[i].get("review_reasons")]
        timepoints = None
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
            "needs_seed": bool(c.get("needs_seed")) and not c["has_proposed_mask"],
            "automatic_volume_ml": _round_ml(c["automatic_volume_ml"]),
            "qc_montage": f"{code}_qc.png",
            "overlays": overlays,
            "review_reasons": list(c.get("review_reasons", [])),
        })
        placement[index] = {"case_code": code, "position": position, "overlay_labels": labels}
        if timepoints is not None:
            participant, timepoint, n_timepoints, first = timepoints[index]
            entries[-1].update(participant=participant, timepoint=timepoint, n_timepoints=n_timepoints,
                               prior_case=None if first == index else codes[first])
            placement[index].update(participant_code=participant, timepoint=timepoint)
    worklist = {
        "format": "khe-vol reader worklist 1",
        "reader": reader,
        "n_cases": len(entries),
        "verdicts": list(VERDICTS),
        "cases": entries,
    }
    if timepoints is not None:
        groups = {}
        for e in entries:
            groups.setdefault(e["participant"], []).append(e["case_code"])
        worklist["reading_mode"] = reading_mode
        worklist["participants"] = [{"participant": p, "cases": c} for p, c in groups.items()]
    return worklist, placement


def _longitudinal_order(cases, reader, seed):
    """Worklist order and, per case, (participant code, timepoint, n timepoints, index of its T1)."""
    by_participant = {}
    for i, c in enumerate(cases):
        by_participant.setdefault(c["participant_id"], []).append(i)
    participants = sorted(by_participant)
    labels = {pid: participant_code(seed, reader, pid) for pid in participants}
    if len(set(labels.values())) != len(labels):
        raise PackageError(f"two participants of reader {reader} got the same code; choose another seed")
    for pid in participants:
        by_participant[pid].sort(key=lambda i: (cases[i].get("month") is None, cases[i].get("month") or 0,
                                                cases[i]["session_id"]))
    shuffled = [participants[i] for i in reader_order(len(participants), seed, reader)]
    flagged = {pid for pid in participants if any(cases[i].get("review_reasons") for i in by_participant[pid])}
    order, timepoints = [], {}
    for pid in [p for p in shuffled if p in flagged] + [p for p in shuffled if p not in flagged]:
        group = by_participant[pid]
        for t, i in enumerate(group, start=1):
            order.append(i)
            timepoints[i] = (labels[pid], t, len(group), group[0])
    return order, timepoints


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
    tiles: object = None  # report.montage.MontageTiles: drawn per reader, titled with that reader's case code
    overlays: list = field(default_factory=list)

    @property
    def ids(self):
        return self.record["participant_id"], self.record["session_id"]


def _resolve(path, source_root):
    path = Path(path)
    return path if path.is_absolute() or source_root is None else Path(source_root) / path


def _prepare_series(record_path, source_root, overlays):
    record_path = Path(record_path)
    record = json.loads(record_path.read_text(encoding="utf-8"))
    s = _Series(record_path, record, sha256_file(record_path))
    if record.get("reference_needs_seed"):
        # Nothing to show yet: it is tracked from a reader's own seeded
        # baseline, and then packaged for that reader only.
        s.problem = (f"{record_path}: not packaged: the reference session has no seed yet; tracked and packaged "
                     "for each reader once that reader seeds it")
        return s
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
    mask_path = mask_beside(record_path)
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
    s.tiles = montage_tiles(image.data, image.affine, mask)
    for o in overlays:
        s.overlays.append(_prepare_overlay(o, img, image, source))
    return s


def _reader_montage(tiles, entry):
    """The montage in a reader's package: the case code, the automatic volume and review codes, nothing else.

    The same words the worklist gives this reader (never a participant,
    session, date or file name: those are only in the report's montages).
    """
    volume = entry["automatic_volume_ml"]
    lines = [f"automatic volume {volume:.2f} mL" if volume is not None else "no proposed mask",
             review_line(entry["review_reasons"])]
    return montage_png(tiles, f"case {entry['case_code']}", lines)


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
    try:
        header, rows = read_tsv_table(path)
    except ValueError as exc:
        raise PackageError(str(exc)) from None
    if not {"participant_id", "session_id"} <= set(header):
        raise PackageError(f"{path}: needs columns participant_id and session_id")
    pid, ses = header.index("participant_id"), header.index("session_id")
    return {(r[pid], r[ses]) for r in rows}


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
                  key_path=None, reader_records=None, display=None,
                  reading_mode="independent"):
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
    reader_records : dict, optional
        reader -> ``record.json`` paths used for that reader's package only,
        each replacing the record of the same series in ``record_paths`` (the
        follow-ups tracked from that reader's own seeded baseline). No other
        reader's package sees them.
    display : dict, optional
        How the reader app shows images (the config's ``reader_display``;
        default :data:`khe_vol.qa.DEFAULT_READER_DISPLAY`), kept in the worklist.
    reading_mode : {"independent", "longitudinal"}
        See :func:`build_worklist`.

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

    common = [_prepare_series(p, source_root, overlay_rows.get(k, [])) for k, p in records]
    own = {}
    for reader, paths in sorted((reader_records or {}).items()):
        if reader not in readers:
            raise PackageError(f"records given for reader {reader}, who is not being packaged")
        own[reader] = {}
        for p in paths:
            s = _prepare_series(p, source_root, [])
            if s.ids not in set(keys):
                raise PackageError(f"{p}: {reader}'s record is for {s.ids[0]} {s.ids[1]}, not a series being packaged")
            own[reader][s.ids] = s
    key_rows = []
    for reader in readers:
        prepared = [own.get(reader, {}).get(s.ids, s) for s in common]
        packaged = [s for s in prepared if s.problem is None]
        cases = [{
            "participant_id": s.ids[0],
            "session_id": s.ids[1],
            "automatic_volume_ml": s.record.get("volume_ml") if s.mask_bytes is not None else None,
            "has_proposed_mask": s.mask_bytes is not None,
            "needs_seed": bool(s.record.get("needs_seed")),
            "month": s.record.get("month"),
            # Codes only: a reason's detail text may name a session.
            "review_reasons": [r["reason"] for r in series_reasons(s.record)],
            "overlays": [{"reader": o["reader"], "verdict": o["verdict"], "volume_ml": o["volume_ml"],
                          "has_mask": o["mask_bytes"] is not None} for o in s.overlays],
        } for s in packaged]
        worklist, placement = build_worklist(cases, reader, seed, reading_mode)
        worklist["display"] = {**DEFAULT_READER_DISPLAY, **(display or {})}
        files = {WORKLIST_NAME: (json.dumps(worklist, indent=2, sort_keys=True) + "\n").encode("utf-8")}
        by_code = {c["case_code"]: c for c in worklist["cases"]}
        for s, place in zip(packaged, placement):
            entry = by_code[place["case_code"]]
            files[entry["image"]] = s.t2_bytes
            files[entry["qc_montage"]] = _reader_montage(s.tiles, entry)
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
    write_key(key_path, readers, key_rows)
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
        participant_code=place.get("participant_code"),
        timepoint=str(place["timepoint"]) if place.get("timepoint") else None,
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
