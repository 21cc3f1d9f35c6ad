"""The unblinding key: case code -> participant and session, outside ``qa/``.

``R/blinding/key.tsv`` (and e.g. ``key_adjudication.tsv``), with a ``.json``
data dictionary beside each. Written by :func:`khe_vol.qa.package.write_package`,
read back by the reads import and the leak audit; the reader app never reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from khe_vol.files import NA, atomic_write_text, read_tsv, tsv_text
from khe_vol.qa import key_dir

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
    "participant_code": "blinded participant code the reader sees in longitudinal reading (n/a: independent "
    "reading, or no case)",
    "timepoint": "T<n> the reader sees in longitudinal reading: the case's place in the participant's scans in "
    "time order (n/a: independent reading, or no case)",
}

#: Columns of keys written before longitudinal reading (still read, e.g. by the audit of an older run).
_FORMER_KEY_COLUMNS = tuple(KEY_COLUMNS)[:-2]

#: Permission bits of a key file: its owner (the core lab's account running the workflow) only.
KEY_FILE_MODE = 0o600

def default_key_path(results_dir):
    """``R/blinding/key.tsv``."""
    return key_dir(results_dir) / "key.tsv"


def write_key(path, readers, rows):
    """Write the key TSV (+ .json dictionary), keeping the rows of readers not rebuilt now."""
    path = Path(path)
    kept = [r for r in read_tsv(path) if r["reader"] not in readers] if path.is_file() else []
    kept = [{c: (None if r.get(c) in (None, NA) else r[c]) for c in KEY_COLUMNS} for r in kept]
    all_rows = kept + rows

    def sort_key(r):
        pos = r.get("position")
        return (r["reader"], pos is None, int(pos) if pos else 0, r["participant_id"], r["session_id"])

    # Paths and messages read back exactly (keep_spaces): the audit opens record_path. Owner-only
    # (0600) from the moment it exists: the key unblinds the trial.
    atomic_write_text(path, tsv_text(KEY_COLUMNS, sorted(all_rows, key=sort_key), keep_spaces=True), mode=KEY_FILE_MODE)
    atomic_write_text(path.with_suffix(".json"), json.dumps(
        {c: {"Description": d} for c, d in KEY_COLUMNS.items()}, indent=2) + "\n")


def is_key_file(path):
    """Whether a file is an unblinding key written by :func:`write_package` (by its header line)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().rstrip("\n") in ("\t".join(KEY_COLUMNS), "\t".join(_FORMER_KEY_COLUMNS))
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
