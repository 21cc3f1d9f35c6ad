"""The reads store: a reader's verdicts in SQLite, append-only.

One database per reader (default ``R/reads/<reader>.sqlite``), outside
``qa/`` and never a workflow output, so rebuilding the package or rerunning
the workflow never deletes a read. WAL journal with ``synchronous=FULL``: a
read is on disk when :func:`record_read` returns, so the app answers the
browser only after the commit and a killed server loses nothing it
confirmed. Rows are never updated or deleted (triggers refuse it); revising a
verdict adds a revision.

A read made by clicking (:mod:`khe_vol.segmentation.interactive`) also stores
its clicks, in order, as JSON in ``clicks``; its ``edited_mask`` is the
server's recomputation from the case image and those clicks. Databases made
before that column existed get it on open (:func:`connect`), their reads kept.

Each read also keeps how long it took (:func:`check_read_seconds`):
``seconds_to_verdict`` (from opening the case page, or from the previous
verdict given on that page, to this verdict) and, for an edited read,
``edit_seconds`` (from the first edit action to the save). NULL when unknown
(older reads, a client that did not send them, or a time over
:data:`MAX_READ_SECONDS`). The reader app never shows them; only the
per-reader summary (:func:`khe_vol.qa.agreement.reader_time_rows`) reads them.
Older databases get these columns on open, like ``clicks``.
"""

from __future__ import annotations

import json
import math
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from khe_vol.qa import VERDICTS
from khe_vol.qa.accounts import create_private

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS reads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reader TEXT NOT NULL,
    case_code TEXT NOT NULL,
    revision INTEGER NOT NULL CHECK (revision >= 1),
    verdict TEXT NOT NULL CHECK (verdict IN ({", ".join(repr(v) for v in VERDICTS)})),
    comment TEXT NOT NULL DEFAULT '',
    edited_mask BLOB,
    edited_volume_ml REAL,
    proposed_mask_sha256 TEXT,
    created_utc TEXT NOT NULL,
    clicks TEXT,
    seconds_to_verdict REAL CHECK (seconds_to_verdict >= 0),
    edit_seconds REAL CHECK (edit_seconds >= 0),
    UNIQUE (reader, case_code, revision),
    CHECK ((verdict = 'edited') = (edited_mask IS NOT NULL))
);
CREATE TRIGGER IF NOT EXISTS reads_append_only_update BEFORE UPDATE ON reads
BEGIN SELECT RAISE(ABORT, 'reads are append-only: add a revision instead'); END;
CREATE TRIGGER IF NOT EXISTS reads_append_only_delete BEFORE DELETE ON reads
BEGIN SELECT RAISE(ABORT, 'reads are append-only: add a revision instead'); END;
"""

_COLUMNS = ("reader", "case_code", "revision", "verdict", "comment", "edited_mask", "edited_volume_ml",
            "proposed_mask_sha256", "created_utc", "clicks", "seconds_to_verdict", "edit_seconds")

#: Columns added after the first release, with their SQL type: added to older databases on open.
_ADDED_COLUMNS = {"clicks": "TEXT", "seconds_to_verdict": "REAL", "edit_seconds": "REAL"}

#: Longest time a read may take, in seconds (4 h): a longer time is a case left open while the
#: reader was away, not reading time, and is kept as unknown (NULL) rather than skewing the summary.
MAX_READ_SECONDS = 4 * 3600.0


def connect(db_path):
    """Open (creating if needed) a reads database.

    Returns
    -------
    sqlite3.Connection
        In autocommit mode (``isolation_level=None``); transactions are explicit.
    """
    db_path = Path(db_path)
    # Owner-only (0600) from its creation; SQLite gives its -wal/-shm files the same bits.
    create_private(db_path)
    con = sqlite3.connect(db_path, isolation_level=None, timeout=30.0)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.executescript(SCHEMA)
    _migrate(con)
    return con


def _migrate(con):
    """Add the columns an older database lacks (ALTER TABLE ADD COLUMN keeps every row; old reads get NULL)."""
    present = {row["name"] for row in con.execute("PRAGMA table_info(reads)")}
    missing = [name for name in _ADDED_COLUMNS if name not in present]
    if not missing:
        return
    con.execute("BEGIN IMMEDIATE")
    try:
        # Another connection may have migrated between our look and the lock.
        present = {row["name"] for row in con.execute("PRAGMA table_info(reads)")}
        for name in missing:
            if name not in present:
                con.execute(f"ALTER TABLE reads ADD COLUMN {name} {_ADDED_COLUMNS[name]}")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def clicks_json(clicks):
    """The JSON text stored for a read's clicks (None: no clicks).

    Parameters
    ----------
    clicks : sequence of Click or of dict ``{"kind", "ras_mm"}``, or None
        In the order they were made; ``ras_mm`` scanner RAS+ mm.

    Returns
    -------
    str or None
        ``[{"kind": ..., "ras_mm": [x, y, z]}, ...]``; floats written so
        they read back exactly.

    Raises
    ------
    ValueError
        An empty list, or a click that is not an include/exclude kind with
        three finite numbers.
    """
    if clicks is None:
        return None
    items = []
    for c in clicks:
        d = c.as_dict() if hasattr(c, "as_dict") else c
        if not isinstance(d, dict) or d.get("kind") not in ("include", "exclude"):
            raise ValueError(f"a stored click is {{'kind': 'include' | 'exclude', 'ras_mm': [x, y, z]}}, not {d!r}")
        try:
            point = [float(v) for v in d["ras_mm"]]
        except (KeyError, TypeError, ValueError):
            point = []
        if len(point) != 3 or not all(math.isfinite(v) for v in point):
            raise ValueError(f"a stored click's ras_mm is three finite numbers, not {d.get('ras_mm')!r}")
        items.append({"kind": d["kind"], "ras_mm": point})
    if not items:
        raise ValueError("a read's clicks are None or at least one click")
    return json.dumps(items)


class RevisionConflict(ValueError):
    """The case's latest revision is not the one the reader's page showed (a double click, another tab)."""

    def __init__(self, case_code, expected, latest):
        super().__init__(f"case {case_code} is at revision {latest}, not {expected} as the page showed: "
                         "this verdict was already saved (or saved from another window); reload the case")
        self.latest = latest


def check_read_seconds(seconds_to_verdict, edit_seconds, verdict):
    """Validate a read's timing (it comes from the browser: hostile until checked).

    Parameters
    ----------
    seconds_to_verdict, edit_seconds : float, str or None
        Seconds; None (or an empty string) = not measured.
    verdict : str
        ``edit_seconds`` is kept only with ``edited`` (other verdicts had no edit to save).

    Returns
    -------
    (float or None, float or None)
        Rounded to 1 ms; None where not measured or over :data:`MAX_READ_SECONDS`.

    Raises
    ------
    ValueError
        Not a number, not finite, negative, or an edit longer than the read.
    """
    out = []
    for name, value in (("seconds_to_verdict", seconds_to_verdict), ("edit_seconds", edit_seconds)):
        if value is None or (isinstance(value, str) and not value.strip()):
            out.append(None)
            continue
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number of seconds, not {str(value)[:40]!r}") from None
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"{name} must be a finite, non-negative number of seconds, not {seconds!r}")
        out.append(None if seconds > MAX_READ_SECONDS else round(seconds, 3))
    total, edit = out
    if verdict != "edited":
        edit = None
    if total is not None and edit is not None and edit > total + 1e-3:
        raise ValueError(f"edit_seconds ({edit}) cannot exceed seconds_to_verdict ({total}): the edit is part of the read")
    return total, edit


def record_read(db_path, reader, case_code, verdict, comment="", edited_mask=None, edited_volume_ml=None,
                proposed_mask_sha256=None, now=None, clicks=None, expected_revision=None, seconds_to_verdict=None,
                edit_seconds=None):
    """Append one read, as the next revision of its case, in one committed transaction.

    Parameters
    ----------
    db_path : path-like
    reader, case_code : str
    verdict : str
        One of :data:`khe_vol.qa.VERDICTS`.
    comment : str
    edited_mask : bytes, optional
        gzip NIfTI of the corrected mask on the case grid; required for
        ``edited`` and refused otherwise.
    edited_volume_ml : float, optional
        Volume of ``edited_mask``, mL.
    proposed_mask_sha256 : str, optional
        SHA-256 of the proposed mask file the reader was shown (None: none).
    now : datetime, optional
        Time of the read (default: now, UTC).
    clicks : sequence of Click or dict, optional
        The reader's clicks in order (:func:`clicks_json`); only with
        ``edited``, whose ``edited_mask`` must then be the recomputation
        from the case image and these clicks (the app's job).
    expected_revision : int, optional
        The case's latest revision the reader's page showed (0: unread). When
        given and the database holds another, nothing is stored and
        :class:`RevisionConflict` is raised: the same page state saves once.
    seconds_to_verdict, edit_seconds : float, optional
        How long the read took, seconds (:func:`check_read_seconds`; never shown to readers).

    Returns
    -------
    dict
        The stored read (without the mask bytes; ``clicks`` as a list or None).
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
    if (verdict == "edited") != (edited_mask is not None):
        raise ValueError("an edited mask goes with, and only with, the verdict 'edited'")
    if clicks is not None and verdict != "edited":
        raise ValueError("clicks go only with the verdict 'edited' (the mask they make)")
    clicks_text = clicks_json(clicks)
    seconds_to_verdict, edit_seconds = check_read_seconds(seconds_to_verdict, edit_seconds, verdict)
    created = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    con = connect(db_path)
    try:
        con.execute("BEGIN IMMEDIATE")  # takes the write lock before reading the last revision
        try:
            (last,) = con.execute("SELECT COALESCE(MAX(revision), 0) FROM reads WHERE reader = ? AND case_code = ?",
                                  (reader, case_code)).fetchone()
            if expected_revision is not None and int(expected_revision) != last:
                raise RevisionConflict(case_code, int(expected_revision), last)
            values = (reader, case_code, last + 1, verdict, comment or "", edited_mask,
                      None if edited_volume_ml is None else float(edited_volume_ml), proposed_mask_sha256, created,
                      clicks_text, seconds_to_verdict, edit_seconds)
            con.execute(f"INSERT INTO reads ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", values)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()
    out = {k: v for k, v in zip(_COLUMNS, values) if k != "edited_mask"}
    out["clicks"] = None if clicks_text is None else json.loads(clicks_text)
    return out


def _rows(db_path, sql, params, with_masks):
    db_path = Path(db_path)
    if not db_path.is_file():
        return []
    con = connect(db_path)
    try:
        rows = [dict(r) for r in con.execute(sql, params)]
    finally:
        con.close()
    for r in rows:
        r.pop("id", None)
        r["clicks"] = None if r.get("clicks") is None else json.loads(r["clicks"])
        if not with_masks:
            r.pop("edited_mask", None)
    return rows


def current_reads(db_path, with_masks=True):
    """The latest revision of every case in a reads database.

    Parameters
    ----------
    db_path : path-like
        A database that does not exist has no reads.
    with_masks : bool
        Include ``edited_mask`` (gzip NIfTI bytes or None).

    Returns
    -------
    list of dict
        Keys ``reader``, ``case_code``, ``revision``, ``verdict``, ``comment``,
        ``edited_mask``, ``edited_volume_ml``, ``proposed_mask_sha256``,
        ``created_utc``, ``clicks`` (list of ``{"kind", "ras_mm"}`` in
        order, or None), ``seconds_to_verdict``, ``edit_seconds`` (None:
        not measured); sorted by reader and case code.
    """
    sql = """SELECT r.* FROM reads r JOIN (
                 SELECT reader, case_code, MAX(revision) AS revision FROM reads GROUP BY reader, case_code
             ) last USING (reader, case_code, revision)
             ORDER BY r.reader, r.case_code"""
    return _rows(db_path, sql, (), with_masks)


def read_history(db_path, case_code, with_masks=False):
    """Every revision of one case, oldest first (same keys as :func:`current_reads`)."""
    sql = "SELECT * FROM reads WHERE case_code = ? ORDER BY reader, revision"
    return _rows(db_path, sql, (case_code,), with_masks)


def all_reads(db_path):
    """Every revision of every case, without masks, by reader, case and revision (same keys as :func:`current_reads`)."""
    return _rows(db_path, "SELECT * FROM reads ORDER BY reader, case_code, revision", (), False)


def edited_mask_bytes(db_path, case_code, revision):
    """The stored edited mask of one revision (gzip NIfTI bytes), or None."""
    rows = _rows(db_path, "SELECT * FROM reads WHERE case_code = ? AND revision = ?", (case_code, revision), True)
    return rows[0]["edited_mask"] if rows else None
