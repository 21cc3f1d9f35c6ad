"""Verify the audit trail of reads databases: the hash chain, and that every read is the one the trail recorded.

:func:`verify_rows` is the check, a pure function over the rows of one
database's ``trail`` and ``reads`` tables (:mod:`khe_vol.qa.store`). It
recomputes each trail record's SHA-256 and its link to the record before,
and compares every ``reads`` row with the trail record that vouches for it
(same reader, case and revision). :func:`verify_database` reads one file
(read-only) and :func:`verify_results` every ``R/reads/*.sqlite``; the
``khe-vol qa verify`` command prints them.

What it cannot see: a chain cut off at its end together with the reads it
vouched for (the last records removed) leaves a valid, shorter chain; keep
the printed summary (records, last SHA-256) with the trial's records to
compare later.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from khe_vol.qa.store import GENESIS_SHA256, canonical_json, read_content, trail_record_sha256


@dataclass(frozen=True)
class Finding:
    """One thing that does not check out.

    ``seq`` is the trail record it is about (None: a read no record vouches
    for, or the whole database); ``message`` says what differs.
    """

    seq: int | None
    message: str


@dataclass
class Verification:
    """The outcome of verifying one reads database."""

    records: int = 0
    reads: int = 0
    signed: int = 0
    last_sha256: str = GENESIS_SHA256
    findings: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.findings

    @property
    def first_altered(self):
        """The first trail record (lowest seq) with a finding, or None."""
        seqs = [f.seq for f in self.findings if f.seq is not None]
        return min(seqs) if seqs else None


def _key(row):
    return (row.get("reader"), row.get("case_code"), row.get("revision"))


def _differing_fields(stored, recorded):
    """Names of the fields in which two read contents (dicts) differ."""
    keys = sorted(set(stored) | set(recorded))
    return [k for k in keys if canonical_json(stored.get(k)) != canonical_json(recorded.get(k))]


def _parse(text):
    try:
        return json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None


def verify_rows(trail_rows, read_rows):
    """Check one database's trail chain and its reads against it.

    Parameters
    ----------
    trail_rows : list of dict
        Every ``trail`` row as stored (``old_value`` / ``new_value`` JSON
        text), in ``seq`` order.
    read_rows : list of dict
        Every ``reads`` row as stored (``edited_mask`` bytes, ``clicks`` JSON text).

    Returns
    -------
    Verification
        ``findings`` sorted by ``seq`` (reads no record vouches for last):
        a record whose SHA-256 does not match its content (altered), whose
        link does not match the record before (a record replaced, removed or
        inserted), whose old value is not the previous revision's new value,
        or whose action does not fit its revision; a redaction whose comment
        hash is not that of the comment it names; a read whose content
        differs from its record's new value (the differing fields named), a
        read no record vouches for, and a record whose read is gone.
    """
    result = Verification(records=len(trail_rows), reads=len(read_rows))
    chain, reads_found, redactions = [], [], []
    prev_sha, prev_seq = GENESIS_SHA256, 0
    by_key = {}
    for rec in trail_rows:
        seq = rec.get("seq")
        if rec.get("signer") is not None:
            result.signed += 1
        try:
            sha_ok = trail_record_sha256(rec) == rec.get("sha256")
        except (KeyError, TypeError, ValueError):
            sha_ok = False
        if not sha_ok:
            chain.append(Finding(seq, f"trail record {seq} was altered: its SHA-256 does not match its content"))
        elif rec.get("prev_sha256") != prev_sha or seq != prev_seq + 1:
            chain.append(Finding(seq, f"trail record {seq} does not link to the record before it (seq {prev_seq}): "
                                      "a record was removed, inserted or replaced"))
        prev_sha, prev_seq = rec.get("sha256"), seq if isinstance(seq, int) else prev_seq + 1
        new_value = _parse(rec.get("new_value"))
        if new_value is None:
            chain.append(Finding(seq, f"trail record {seq}: its new value is not a read's JSON content"))
            continue
        action, revision = rec.get("action"), rec.get("revision")
        if action == "comment_redacted":
            redactions.append(rec)
            continue
        if (action == "read_created") != (revision == 1) and action != "migrated":
            chain.append(Finding(seq, f"trail record {seq}: action {action!r} does not fit revision {revision}"))
        if action == "read_revised":
            before = by_key.get((rec.get("reader"), rec.get("case_code"), revision - 1 if isinstance(revision, int)
                                 else None))
            old_value = _parse(rec.get("old_value"))
            if before is not None and (old_value is None or canonical_json(old_value) != canonical_json(before[1])):
                chain.append(Finding(seq, f"trail record {seq}: its old value is not revision {revision - 1} as "
                                          f"trail record {before[0]['seq']} recorded it"))
        key = _key(rec)
        if key in by_key:
            chain.append(Finding(seq, f"trail record {seq} records {key[1]} revision {key[2]} of {key[0]} again "
                                      f"(first: record {by_key[key][0]['seq']})"))
        else:
            by_key[key] = (rec, new_value)
    result.last_sha256 = prev_sha if trail_rows else GENESIS_SHA256
    for rec in redactions:
        # A redaction hides a comment the trail recorded before it: its hash must be that comment's.
        seq, key = rec.get("seq"), _key(rec)
        before = by_key.get(key)
        hidden = (_parse(rec.get("old_value")) or {}).get("comment_sha256")
        if before is None or before[0].get("seq", 0) >= (seq or 0):
            chain.append(Finding(seq, f"trail record {seq} redacts {key[1]} revision {key[2]} of {key[0]}, which "
                                      "no earlier record holds"))
        elif hidden != hashlib.sha256(str(before[1].get("comment") or "").encode("utf-8", "surrogateescape")
                                      ).hexdigest():
            chain.append(Finding(seq, f"trail record {seq}: the redacted comment's SHA-256 is not that of the comment "
                                      f"trail record {before[0]['seq']} recorded"))

    vouched = set()
    for row in read_rows:
        key = _key(row)
        reader, case_code, revision = key
        if key not in by_key:
            reads_found.append(Finding(None, f"read {case_code} revision {revision} of {reader} is vouched for by no "
                                             "trail record: it was added outside the reads store"))
            continue
        vouched.add(key)
        rec, recorded = by_key[key]
        stored = read_content(row)
        if canonical_json(stored) != canonical_json(recorded):
            fields = ", ".join(_differing_fields(stored, recorded))
            chain.append(Finding(rec["seq"], f"read {case_code} revision {revision} of {reader} differs from trail "
                                             f"record {rec['seq']} in: {fields}"))
    for key, (rec, _) in by_key.items():
        if key not in vouched:
            chain.append(Finding(rec["seq"], f"trail record {rec['seq']} vouches for read {key[1]} revision {key[2]} "
                                             f"of {key[0]}, which is not in the database (deleted)"))
    result.findings = sorted(chain, key=lambda f: f.seq if isinstance(f.seq, int) else 0) + reads_found
    return result


class NotAReadsDatabase(ValueError):
    """A file that holds no reads (e.g. the accounts database)."""


def _tables(con):
    return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def verify_database(db_path):
    """Verify one reads database, opened read-only (it is never modified).

    Returns
    -------
    Verification
        With one finding (seq None) for a database from before the trail,
        which cannot be verified until the store has migrated it, or one
        SQLite cannot read.

    Raises
    ------
    NotAReadsDatabase
        A database without a ``reads`` table (the accounts database).
    FileNotFoundError
    """
    db_path = Path(db_path)
    if not db_path.is_file():
        raise FileNotFoundError(f"{db_path}: no such reads database")
    con = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    # A flipped byte can make a text invalid UTF-8: read it anyway, so it is named rather than crashing the check.
    con.text_factory = lambda b: b.decode("utf-8", "surrogateescape")
    con.row_factory = sqlite3.Row
    try:
        tables = _tables(con)
        if "reads" not in tables:
            raise NotAReadsDatabase(f"{db_path}: not a reads database (no reads table)")
        read_rows = [dict(r) for r in con.execute("SELECT * FROM reads ORDER BY id")]
        for r in read_rows:
            r.pop("id", None)
        if "trail" not in tables:
            return Verification(reads=len(read_rows), findings=[Finding(None, (
                "no audit trail: a database from before the trail; the reading service adds it, with a "
                "'migrated' record per read, when it next opens the database"))])
        trail_rows = [dict(r) for r in con.execute("SELECT * FROM trail ORDER BY seq")]
    except sqlite3.DatabaseError as exc:
        return Verification(findings=[Finding(None, f"SQLite cannot read it: {exc}")])
    finally:
        con.close()
    return verify_rows(trail_rows, read_rows)


def verify_results(results_dir):
    """Verify every reads database ``R/reads/*.sqlite`` (the accounts database is skipped).

    Returns
    -------
    list of (Path, Verification)
        Sorted by file name.

    Raises
    ------
    FileNotFoundError
        No ``R/reads`` folder.
    """
    folder = Path(results_dir) / "reads"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no reads folder (no reader has saved a read yet)")
    out = []
    for path in sorted(folder.glob("*.sqlite")):
        try:
            out.append((path, verify_database(path)))
        except NotAReadsDatabase:
            continue
    return out
