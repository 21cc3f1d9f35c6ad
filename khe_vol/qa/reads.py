"""Reads back into the results: unblind each read and decide every series' final volume.

Rules (also in README, "Blinded reading"):

- Each reader's read of a series gives a volume: ``accept`` -> the automatic
  mask's; ``edited`` -> the reader's mask's (on the series grid); ``no_residual_lesion``
  -> 0 mL; ``reject`` -> none (the series is excluded as unmeasurable).
  A read made on another proposed mask than the current one (the package was
  rebuilt since) is *stale* and counts as unread.
- A series is final only when every reader has read it. With two readers,
  a follow-up whose response category differs between them (each reader's
  category from their own baseline and follow-up reads), or a series one
  reader rejected and the other measured, goes to the adjudicator together
  with its baseline; the adjudicator's read decides those series.
- Otherwise the first reader's read gives the final volume (the second is a
  check: for agreeing categories either gives the same category).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from khe_vol.files import MASK_NAME, atomic_write_text, mask_beside, read_records, replacing_dir, write_tsv
from khe_vol.geometry import voxel_volume_mm3
from khe_vol.measure import lesion_size
from khe_vol.nifti import load_image, mask_image, write_nifti
from khe_vol.qa import ADJUDICATION_COLUMNS, OVERLAY_COLUMNS, default_db_path
from khe_vol.qa.agreement import AUTO_READER, agreement_rows, write_agreement
from khe_vol.qa.key import read_key
from khe_vol.qa.store import current_reads
from khe_vol.report.provenance import table_provenance
from khe_vol.response import classify_change
from khe_vol.segmentation.uncertainty import volume_band_ml
from khe_vol.series import SEED_FROM_READER

#: ``method`` of a baseline whose mask a reader made by seeding it in the reader app.
METHOD_READER_SEEDED = "reader_seeded"

#: ``status`` of a series with no final volume, by ``qa_status``: waiting for a reader is not an
#: error (nothing failed), nor is a reader's rejection (a decision); a series that could not be
#: packaged (``no_case``) is.
_UNDECIDED_STATUS = {"pending_seed": "pending", "pending_read": "pending", "pending_adjudication": "pending",
                     "rejected": "excluded"}

_VERDICT_STATUS = {"accept": "accepted", "edited": "edited", "no_residual_lesion": "no_residual_lesion",
                   "reject": "rejected"}


@dataclass
class ReaderRead:
    """One reader's current, usable read of one series."""

    reader: str
    case_code: str
    verdict: str | None = None  # None: unread or stale
    comment: str = ""
    revision: int | None = None
    n_voxels: int | None = None  # None for reject or unread
    mask: np.ndarray | None = field(default=None, repr=False)  # edited mask on the series grid
    note: str | None = None
    clicks: list | None = None  # the read's clicks (kind, ras_mm), in order, when it was made by clicking
    #: The reader's own record the case was built from (a follow-up tracked from
    #: this reader's seeded baseline), or None: the cohort's record.
    own_record: dict | None = field(default=None, repr=False)
    own_record_path: Path | None = None

    @property
    def read(self):
        return self.verdict is not None


def edited_mask_array(payload, shape, affine, atol_mm=1e-3):
    """Decode an edited mask (gzip NIfTI bytes) and check it lies on the series grid.

    Parameters
    ----------
    payload : bytes
    shape : tuple of int
        Series array shape.
    affine : (4, 4) array_like
        Series voxel-to-RAS+ affine, mm.
    atol_mm : float
        Largest difference of affine entries accepted, mm.

    Returns
    -------
    ndarray of bool
    """
    raw = gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload
    img = nib.Nifti1Image.from_bytes(raw)
    if tuple(img.shape) != tuple(shape) or not np.allclose(img.affine, affine, atol=atol_mm):
        raise ValueError(f"edited mask grid {img.shape} does not match the series grid {tuple(shape)}")
    return np.asarray(img.dataobj) != 0


def reader_reads(key_rows, reads, records, reader_records=None):
    """Every reader's usable read of every packaged series.

    Parameters
    ----------
    key_rows : list of dict
        Rows of the unblinding key (reader, case_code, participant_id,
        session_id, status, proposed_mask_sha256).
    reads : list of dict
        Current reads of all readers (:func:`khe_vol.qa.store.current_reads`, with masks).
    records : dict
        (participant_id, session_id) -> automatic series record.
    reader_records : dict, optional
        (reader, participant_id, session_id) -> (record, path): the reader's
        own record a case was built from (follow-ups tracked from that
        reader's seeded baseline); it replaces the automatic one for that
        reader's read.

    Returns
    -------
    dict
        (participant_id, session_id) -> {reader: ReaderRead}.
    """
    latest = {(r["reader"], r["case_code"]): r for r in reads}
    reader_records = reader_records or {}
    out = {}
    for row in key_rows:
        if row.get("status") != "case":
            continue
        ids = (row["participant_id"], row["session_id"])
        entry = ReaderRead(row["reader"], row["case_code"])
        if (row["reader"], *ids) in reader_records:
            entry.own_record, entry.own_record_path = reader_records[(row["reader"], *ids)]
        out.setdefault(ids, {})[row["reader"]] = entry
        read = latest.get((row["reader"], row["case_code"]))
        if read is None:
            continue
        if read.get("proposed_mask_sha256") != row.get("proposed_mask_sha256"):
            entry.note = (f"{row['reader']}'s read (revision {read['revision']}) was made on another proposed "
                          "mask than the current one; it must be read again")
            continue
        rec = entry.own_record or records[ids]
        verdict = read["verdict"]
        if verdict == "accept":
            if row.get("proposed_mask_sha256") is None or rec["status"] != "ok":
                entry.note = f"{row['reader']} accepted a case that had no proposed mask; it must be read again"
                continue
            entry.n_voxels = int(rec["n_voxels"])
        elif verdict == "edited":
            try:
                entry.mask = edited_mask_array(read["edited_mask"], rec["shape"], rec["affine"])
            except (ValueError, OSError, nib.filebasedimages.ImageFileError) as exc:
                entry.note = f"{row['reader']}'s edited mask cannot be used ({exc}); it must be read again"
                continue
            entry.n_voxels = int(entry.mask.sum())
        elif verdict == "no_residual_lesion":
            entry.n_voxels = 0
        entry.verdict, entry.comment, entry.revision = verdict, read.get("comment") or "", read["revision"]
        entry.clicks = read.get("clicks") or None
    return out


def reader_category(base, follow, rec_base, rec_follow):
    """A reader's response category of a follow-up from their own two reads (None if undefined)."""
    if base is None or follow is None or base.n_voxels in (None, 0) or follow.n_voxels is None:
        return None
    return classify_change(base.n_voxels, series_voxel_mm3(rec_base), follow.n_voxels, series_voxel_mm3(rec_follow))[0]


def series_voxel_mm3(record):
    """Voxel volume of a series' own grid, mm^3 (from its affine: set even when segmentation failed)."""
    return voxel_volume_mm3(np.asarray(record["affine"], float))


def needs_adjudication(by_series, records, readers, baseline_session_id):
    """Series two readers disagree on, with the baseline of each disagreeing follow-up.

    Returns
    -------
    dict
        (participant_id, session_id) -> reason (str).
    """
    if len(readers) != 2:
        return {}
    a, b = readers
    out = {}
    for ids, per_reader in sorted(by_series.items()):
        ra, rb = per_reader.get(a), per_reader.get(b)
        if ra is None or rb is None or not (ra.read and rb.read):
            continue
        pid, ses = ids
        base_ids = (pid, baseline_session_id)
        if (ra.verdict == "reject") != (rb.verdict == "reject"):
            out[ids] = "one reader rejected the series, the other measured it"
            if ses != baseline_session_id and base_ids in by_series:
                # The adjudicator judges a follow-up against the baseline it is compared with.
                out.setdefault(base_ids, f"baseline of a disagreeing follow-up ({ses})")
            continue
        if ses == baseline_session_id or base_ids not in by_series or base_ids not in records:
            continue
        bases = by_series[base_ids]
        cat_a = reader_category(bases.get(a), ra, records[base_ids], records[ids])
        cat_b = reader_category(bases.get(b), rb, records[base_ids], records[ids])
        if cat_a is not None and cat_b is not None and cat_a != cat_b:
            out[ids] = f"response categories differ ({a}: {cat_a}, {b}: {cat_b})"
            out.setdefault(base_ids, f"baseline of a disagreeing follow-up ({ses})")
    return out


def final_record(record, per_reader, readers, adjudicator, adjudication_reason):
    """The record of one series with its final volume and where it came from.

    Parameters
    ----------
    record : dict
        Automatic series record.
    per_reader : dict or None
        {reader: ReaderRead} for this series (None: no case was made).
    readers : list of str
    adjudicator : str or None
    adjudication_reason : str or None
        Why the series needs adjudication (None: it does not).

    Returns
    -------
    final : dict
        ``record`` with ``volume_auto_ml``, ``qa_status``, ``volume_source``,
        ``reads`` (per reader verdict/volume) and, where decided, the final
        ``n_voxels``/``volume_ml``/band; ``status`` ``ok`` only with a final volume.
    mask : ndarray or None
        The deciding reader's edited mask, when the final volume comes from one.
    """
    final = dict(record)
    final["volume_auto_ml"] = record.get("volume_ml") if record["status"] == "ok" else None
    final["adjudication"] = adjudication_reason
    if not readers:
        final["qa_status"] = "not_configured"
        final["volume_source"] = record.get("method")
        return final, None
    per_reader = per_reader or {}
    final["reads"] = {r: {"case_code": e.case_code, "verdict": e.verdict, "revision": e.revision,
                          "n_voxels": e.n_voxels, "comment": e.comment, "note": e.note}
                      for r, e in sorted(per_reader.items())}

    def undecided(status, message):
        final.update(qa_status=status, volume_source=None, status=_UNDECIDED_STATUS.get(status, "error"),
                     message=message, n_voxels=None,
                     volume_ml=None, volume_low_ml=None, volume_high_ml=None, mesh_volume_ml=None,
                     max_diameter_cm=None)
        return final, None

    waiting = [r for r in readers if r not in per_reader or not per_reader[r].read]
    # A baseline with no seed is seeded by each reader; a follow-up of it is
    # shown to a reader only once that reader has seeded the baseline.
    unseeded = (waiting if record.get("needs_seed") else
                [r for r in waiting if r not in per_reader] if record.get("reference_needs_seed") else [])
    if unseeded:
        what = "this baseline" if record.get("needs_seed") else f"the baseline ({record.get('reference_session_id')})"
        return undecided("pending_seed", f"waiting for {', '.join(unseeded)} to seed {what} in the reader app "
                         "(no seed in the seeds table; each reader's follow-ups are tracked from that reader's "
                         "own seeded baseline)")
    if not per_reader:
        return undecided("no_case", record.get("message") or "the series could not be packaged for readers")
    if waiting:
        notes = "; ".join(per_reader[r].note for r in waiting if r in per_reader and per_reader[r].note)
        return undecided("pending_read", f"waiting for {', '.join(waiting)}" + (f": {notes}" if notes else ""))
    if adjudication_reason:
        entry = per_reader.get(adjudicator)
        if entry is None or not entry.read:
            note = f": {entry.note}" if entry is not None and entry.note else ""
            return undecided("pending_adjudication",
                             f"waiting for adjudicator {adjudicator} ({adjudication_reason}){note}")
    decider = per_reader[adjudicator if adjudication_reason else readers[0]]
    if decider.own_record is not None:
        # Measured from the deciding reader's own seeded baseline: that record
        # is the series' automatic result for this decision.
        final = {**decider.own_record, "adjudication": final["adjudication"], "reads": final["reads"],
                 "volume_auto_ml": decider.own_record.get("volume_ml") if decider.own_record["status"] == "ok"
                 else None}
    if decider.verdict == "reject":
        undecided("rejected", f"rejected as unmeasurable by {decider.reader}"
                  + (f": {decider.comment}" if decider.comment else ""))
        final["volume_source"] = f"{decider.reader}:reject"
        return final, None
    final["qa_status"] = _VERDICT_STATUS[decider.verdict]
    final["volume_source"] = f"{decider.reader}:{decider.verdict}"
    if decider.verdict == "accept":
        return final, None
    affine = np.asarray(record["affine"], float)
    mask = decider.mask if decider.verdict == "edited" else np.zeros(record["shape"], bool)
    final.update(lesion_size(mask, affine))
    final["volume_low_ml"], final["volume_high_ml"] = volume_band_ml(mask, affine)
    final.update(status="ok", message=None)
    if record.get("needs_seed") and decider.verdict == "edited":
        # The reader seeded this baseline: the seed is the first include click.
        final.update(method=METHOD_READER_SEEDED, seed_source=SEED_FROM_READER, seed_ras_mm=first_include(decider.clicks))
    return final, (mask if decider.verdict == "edited" else None)


def first_include(clicks):
    """The RAS+ mm point of the first include click (the seed), or None."""
    for click in clicks or []:
        if isinstance(click, dict) and click.get("kind") == "include":
            return [float(v) for v in click["ras_mm"]]
    return None


def apply_reads(records, key_rows, reads, readers, adjudicator, baseline_session_id):
    """Final records of a cohort from its automatic records and every read.

    Parameters
    ----------
    records : list of dict
        Automatic series records.
    key_rows : list of dict
        The unblinding key.
    reads : list of dict
        Current reads of all readers and the adjudicator.
    readers : list of str
    adjudicator : str or None
    baseline_session_id : str

    Returns
    -------
    finals : list of dict
        One final record per series, in the order of ``records``.
    adjudication : dict
        (participant_id, session_id) -> reason, for series the adjudicator must read.
    edited : list of (reader, participant_id, session_id, mask)
        Every usable edited mask of every reader, for the derivatives.
    """
    by_ids = {(r["participant_id"], r["session_id"]): r for r in records}
    return decide_series(records, reader_reads(key_rows, reads, by_ids), readers, adjudicator, baseline_session_id)


def decide_series(records, by_series, readers, adjudicator, baseline_session_id):
    """:func:`apply_reads` on reads already unblinded by :func:`reader_reads`."""
    by_ids = {(r["participant_id"], r["session_id"]): r for r in records}
    adjudication = needs_adjudication(by_series, by_ids, list(readers), baseline_session_id)
    if adjudication and adjudicator is None:
        # Without an adjudicator the first reader decides; the disagreement stays visible.
        reasons, adjudication = adjudication, {}
    else:
        reasons = adjudication
    finals = []
    for rec in records:
        ids = (rec["participant_id"], rec["session_id"])
        final, _ = final_record(rec, by_series.get(ids), list(readers), adjudicator, adjudication.get(ids))
        if ids in reasons and not adjudication:
            final["adjudication"] = f"not adjudicated (no adjudicator configured): {reasons[ids]}"
        finals.append(final)
    edited = [(reader, pid, ses, entry.mask)
              for (pid, ses), per_reader in sorted(by_series.items())
              for reader, entry in sorted(per_reader.items()) if entry.mask is not None]
    return finals, adjudication, edited


# --------------------------------------------------------------------------
# File edges: the adjudication list (`khe-vol qa disagreements`) and the final
# records (`khe-vol qa final`).
# --------------------------------------------------------------------------


def load_reads(results_dir, readers, key_paths, record_paths):
    """Everything the reads import starts from.

    Parameters
    ----------
    results_dir : path-like
        Reads are taken from ``R/reads/<reader>.sqlite``.
    readers : list of str
        Whose reads to load.
    key_paths : list of path-like
        Unblinding key TSVs.
    record_paths : list of path-like
        ``record.json`` files of the workflow (the automatic mask beside each).

    Returns
    -------
    records : list of dict
    record_paths : dict
        (participant_id, session_id) -> the record's path.
    key_rows : list of dict
    reads : list of dict
        Current reads of ``readers``, with edited masks.
    reader_records : dict
        (reader, participant_id, session_id) -> (record, path) of every case
        the key says was built from a reader's own record (not one of
        ``record_paths``).
    """
    records, paths = [], {}
    for path in record_paths:
        for rec in read_records([path]):
            records.append(rec)
            paths[(rec["participant_id"], rec["session_id"])] = Path(path)
    key_rows = read_key(results_dir, key_paths)
    reader_records = {}
    for row in key_rows:
        own = row.get("record_path")
        ids = (row["participant_id"], row["session_id"])
        if row.get("status") == "case" and own and ids in paths and Path(own) != paths[ids]:
            reader_records[(row["reader"], *ids)] = (read_records([own])[0], Path(own))
    reads = [r for reader in readers for r in current_reads(default_db_path(results_dir, reader))]
    return records, paths, key_rows, reads, reader_records


def write_disagreements(results_dir, readers, baseline_session_id, key_paths, record_paths, out_tsv, overlays_tsv,
                        overlay_dir):
    """Write the adjudication list and the readers' reads of those series, shown to the adjudicator.

    Parameters
    ----------
    results_dir, readers, key_paths, record_paths
        As :func:`load_reads` (``readers``: the two blinded readers).
    baseline_session_id : str
    out_tsv : path-like
        The series to adjudicate (:data:`khe_vol.qa.ADJUDICATION_COLUMNS`).
    overlays_tsv : path-like
        The readers' reads of them (:data:`khe_vol.qa.OVERLAY_COLUMNS`).
    overlay_dir : path-like
        Folder (rebuilt as a whole) for the readers' edited masks the overlays point to.

    Returns
    -------
    dict
        (participant_id, session_id) -> why it needs adjudication.
    """
    records, paths, key_rows, reads, reader_records = load_reads(results_dir, readers, key_paths, record_paths)
    by_ids = {(r["participant_id"], r["session_id"]): r for r in records}
    by_series = reader_reads(key_rows, reads, by_ids, reader_records)
    adjudication = needs_adjudication(by_series, by_ids, readers, baseline_session_id)
    overlay_dir = Path(overlay_dir)
    series_rows, overlay_rows = [], []
    with replacing_dir(overlay_dir) as tmp:
        for (pid, ses), reason in sorted(adjudication.items()):
            series_rows.append({"participant_id": pid, "session_id": ses, "reason": reason})
            rec = by_ids[(pid, ses)]
            for reader, entry in sorted(by_series[(pid, ses)].items()):
                if reader not in readers:
                    continue
                mask_path = None
                if entry.verdict == "accept":
                    mask_path = mask_beside(entry.own_record_path or paths[(pid, ses)])
                elif entry.verdict == "edited":
                    name = Path(reader, f"{pid}_{ses}_mask.nii.gz")
                    write_nifti(tmp / name, mask_image(entry.mask, rec["affine"]))
                    mask_path = overlay_dir / name  # where it is once the folder is swapped in
                volume = None if entry.n_voxels is None else f"{entry.n_voxels * series_voxel_mm3(rec) / 1000:.3f}"
                overlay_rows.append({"participant_id": pid, "session_id": ses, "reader": reader,
                                     "verdict": entry.verdict, "volume_ml": volume, "mask": mask_path})
    # keep_spaces: the package reads the mask paths back.
    write_tsv(out_tsv, ADJUDICATION_COLUMNS, series_rows, keep_spaces=True)
    write_tsv(overlays_tsv, OVERLAY_COLUMNS, overlay_rows, keep_spaces=True)
    return adjudication


def agreement_reads(records, by_series, readers, baseline_session_id, auto_mask):
    """Per-reader reads (and the automatic result) in the form :mod:`khe_vol.qa.agreement` takes.

    Parameters
    ----------
    records : dict
        (participant_id, session_id) -> automatic record.
    by_series : dict
        From :func:`reader_reads`.
    readers : list of str
        The blinded readers (the adjudicator is not compared).
    baseline_session_id : str
    auto_mask : callable
        (participant_id, session_id) -> the automatic mask array; called only
        for series some reader edited (their masks are compared with it).

    Returns
    -------
    list of dict
    """
    rows = []
    for ids, per_reader in sorted(by_series.items()):
        rec = records[ids]
        base_ids = (ids[0], baseline_session_id)
        base_reads = by_series.get(base_ids, {})
        affine = np.asarray(rec["affine"], float)
        edited_here = any(per_reader.get(r) is not None and per_reader[r].mask is not None for r in readers)
        for reader in readers:
            entry = per_reader.get(reader)
            if entry is None or not entry.read or entry.verdict == "reject":
                continue
            category = None
            if ids[1] != baseline_session_id and base_ids in records:
                category = reader_category(base_reads.get(reader), entry, records[base_ids], rec)
            row = {"participant_id": ids[0], "session_id": ids[1], "month": rec.get("month"), "reader": reader,
                   "volume_ml": entry.n_voxels * series_voxel_mm3(rec) / 1000.0, "category": category}
            if entry.mask is not None:
                row.update(mask=entry.mask, affine=affine)
            rows.append(row)
        if rec["status"] == "ok":
            category = None
            base = records.get(base_ids)
            if ids[1] != baseline_session_id and base is not None and base["status"] == "ok" and base["n_voxels"]:
                category = classify_change(base["n_voxels"], base["voxel_volume_mm3"],
                                           rec["n_voxels"], rec["voxel_volume_mm3"])[0]
            row = {"participant_id": ids[0], "session_id": ids[1], "month": rec.get("month"),
                   "reader": AUTO_READER, "volume_ml": rec["volume_ml"], "category": category}
            if edited_here:
                row.update(mask=auto_mask(*ids), affine=affine)
            rows.append(row)
    return rows


def write_final(results_dir, readers, adjudicator, baseline_session_id, key_paths, record_paths, out_json, edited_dir,
                agreement_tsv):
    """Write the final records, every reader's edited masks and the agreement table.

    Parameters
    ----------
    results_dir, key_paths, record_paths
        As :func:`load_reads`.
    readers : list of str
        The blinded readers.
    adjudicator : str or None
    baseline_session_id : str
    out_json : path-like
        JSON list of final series records.
    edited_dir : path-like
        Folder (rebuilt as a whole) of ``<reader>/<participant>/<session>/mask.nii.gz``
        (``khe-vol derivatives --edited-dir`` reads it).
    agreement_tsv : path-like
        ``qa_agreement.tsv`` (its ``.json`` dictionary goes beside it).

    Returns
    -------
    finals, adjudication, edited
        As :func:`apply_reads`.
    """
    everyone = list(readers) + ([adjudicator] if adjudicator else [])
    records, paths, key_rows, reads, reader_records = load_reads(results_dir, everyone, key_paths, record_paths)
    by_ids = {(r["participant_id"], r["session_id"]): r for r in records}
    # Unblinded (and edited masks decoded) once, for the final records and the agreement.
    by_series = reader_reads(key_rows, reads, by_ids, reader_records)
    finals, adjudication, edited = decide_series(records, by_series, readers, adjudicator, baseline_session_id)
    with replacing_dir(edited_dir) as tmp:
        for reader, pid, ses, mask in edited:
            write_nifti(tmp / reader / pid / ses / MASK_NAME, mask_image(mask, by_ids[(pid, ses)]["affine"]))

    def auto_mask(pid, ses):
        return load_image(mask_beside(paths[(pid, ses)]), "mask").data != 0

    write_agreement(agreement_tsv, agreement_rows(
        agreement_reads(by_ids, by_series, list(readers), baseline_session_id, auto_mask)),
        table_provenance(list(key_paths)))
    atomic_write_text(out_json, json.dumps(finals, indent=2) + "\n")
    return finals, adjudication, edited
