"""Reader-seeded baselines: a reader's read of a baseline with no seed feeds the next run.

A baseline with no row in the seeds table and no reader mask
(:data:`khe_vol.plan.SOURCE_NEEDS_SEED`) is shown to every reader as a
``needs_seed`` case. A reader seeds it in the reader app by clicking (verdict
``edited``: the server's mask from the clicks, stored with the clicks). The
next workflow run finds that read (:func:`seeded_baselines`), turns it into
a baseline record of that reader only (:func:`reader_baseline_record`) and
tracks the participant's follow-ups from it; those follow-ups go to that
reader's worklist only. Another reader's package and tables never see it:
double reads stay independent.

Reads are found by case code (:func:`khe_vol.qa.codes.case_code`, from the
secret ``qa_seed``), so no unblinding key is needed to find them.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from khe_vol.qa import default_db_path
from khe_vol.qa.codes import case_code
from khe_vol.qa.store import current_reads


@dataclass(frozen=True)
class SeedingRead:
    """One reader's usable read of a baseline that had no seed."""

    reader: str
    participant_id: str
    case_code: str
    db_path: Path
    #: SHA-256 of the stored mask and the clicks: changes exactly when the
    #: reader's baseline does (a revision with the same mask does not).
    fingerprint: str


def read_fingerprint(read):
    """SHA-256 (hex) of a read's edited mask bytes and its clicks (JSON)."""
    digest = hashlib.sha256(read["edited_mask"] or b"")
    digest.update(json.dumps(read.get("clicks"), sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def usable_seeding_read(read, baseline_record):
    """The reader's baseline mask from a read, or why it cannot seed the follow-ups.

    Parameters
    ----------
    read : dict
        A current read (:func:`khe_vol.qa.store.current_reads`, with masks).
    baseline_record : dict
        The cohort's record of that baseline (``needs_seed``; ``shape``,
        ``affine`` of the series grid, voxel -> RAS+ mm).

    Returns
    -------
    mask : ndarray of bool or None
        On the series grid; None when the read cannot be used.
    problem : str or None
        Why not (None when ``mask`` is given, or when the read is simply
        not a seeding one: accept, reject, no residual lesion).
    """
    from khe_vol.qa.reads import edited_mask_array

    if read["verdict"] != "edited":
        return None, None
    if read.get("proposed_mask_sha256") is not None:
        return None, "the read was made on a proposed mask, not on the unseeded case; it must be read again"
    try:
        mask = edited_mask_array(read["edited_mask"], baseline_record["shape"], baseline_record["affine"])
    except (ValueError, OSError, TypeError, nib.filebasedimages.ImageFileError) as exc:
        return None, f"the stored mask cannot be used ({exc}); it must be read again"
    if not mask.any():
        return None, "the stored mask is empty: there is no lesion to track the follow-ups from; it must be read again"
    return mask, None


def seeded_baselines(results_dir, readers, qa_seed, baseline_records):
    """Every reader's usable seeding read of every baseline that had no seed.

    Parameters
    ----------
    results_dir : path-like
        Reads are in ``R/reads/<reader>.sqlite``.
    readers : list of str
        The blinded readers.
    qa_seed : int
        The secret seed of the case codes.
    baseline_records : dict
        participant_id -> the cohort's baseline record (``needs_seed``), for
        the baselines that exist so far.

    Returns
    -------
    found : dict
        (reader, participant_id) -> :class:`SeedingRead`.
    problems : list of str
        Reads that cannot be used and unreadable databases, each naming the
        database, the case and the problem; they never stop the run.
    """
    found, problems = {}, []
    for reader in readers:
        db = default_db_path(results_dir, reader)
        if not db.is_file() or not baseline_records:
            continue
        try:
            reads = {r["case_code"]: r for r in current_reads(db)}
        except sqlite3.Error as exc:
            problems.append(f"{db}: reads database cannot be read ({exc}); {reader}'s seeded baselines are not used")
            continue
        for pid, record in sorted(baseline_records.items()):
            if not record.get("needs_seed"):
                continue
            code = case_code(qa_seed, reader, pid, record["session_id"])
            read = reads.get(code)
            if read is None:
                continue
            mask, problem = usable_seeding_read(read, record)
            if problem:
                problems.append(f"{db}: {reader}'s read of case {code} (revision {read['revision']}) cannot seed "
                                f"the follow-ups: {problem}")
            if mask is not None:
                found[(reader, pid)] = SeedingRead(reader, pid, code, db, read_fingerprint(read))
    return found, problems


def reader_baseline_record(baseline_record, mask, reader, read):
    """A baseline record of one reader's seeded mask, to track that reader's follow-ups from.

    Parameters
    ----------
    baseline_record : dict
        The cohort's record of the baseline (``needs_seed``, on the series grid).
    mask : ndarray of bool
        The reader's mask on that grid (:func:`usable_seeding_read`).
    reader : str
    read : dict
        The read (``revision``, ``clicks``).

    Returns
    -------
    dict
        A record with ``status`` ok, ``method`` ``reader_seeded``,
        ``seed_source`` ``reader`` and ``seed_ras_mm`` the first include
        click (None when the reader drew without clicking).
    """
    from khe_vol.measure import lesion_size
    from khe_vol.qa.reads import METHOD_READER_SEEDED, first_include
    from khe_vol.segmentation.uncertainty import volume_band_ml
    from khe_vol.series import SEED_FROM_READER

    affine = np.asarray(baseline_record["affine"], float)
    record = dict(baseline_record)
    record.update(lesion_size(mask, affine))
    record["volume_low_ml"], record["volume_high_ml"] = volume_band_ml(mask, affine)
    record.update(status="ok", message=None, method=METHOD_READER_SEEDED, needs_seed=False,
                  seed_source=SEED_FROM_READER, seed_ras_mm=first_include(read.get("clicks")),
                  details={"reader": reader, "read_revision": read["revision"], "clicks": read.get("clicks")})
    return record


def write_reader_baseline(db_path, reader, code, fingerprint, baseline_record_path, out_record, out_mask):
    """Write one reader's seeded baseline (record + mask) from their reads database.

    Raises
    ------
    ValueError
        If the read is gone, changed since the run was planned (its
        fingerprint differs) or cannot be used; the message names the
        database and the case.
    """
    from khe_vol.files import atomic_write_text, read_records
    from khe_vol.nifti import mask_image, write_nifti

    baseline = read_records([baseline_record_path])[0]
    read = next((r for r in current_reads(db_path) if r["case_code"] == code), None)
    if read is None or read_fingerprint(read) != fingerprint:
        raise ValueError(f"{db_path}: {reader}'s read of case {code} changed since this run was planned; run again")
    mask, problem = usable_seeding_read(read, baseline)
    if mask is None:
        raise ValueError(f"{db_path}: {reader}'s read of case {code} cannot seed the follow-ups: {problem}")
    record = reader_baseline_record(baseline, mask, reader, read)
    write_nifti(out_mask, mask_image(mask, baseline["affine"]))
    atomic_write_text(out_record, json.dumps(record, indent=2) + "\n")
    return record
