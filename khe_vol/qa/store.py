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

Every read also writes one record to the ``trail`` table, in the same
transaction (21 CFR 11.10(e) in spirit): who (``reader``), when (server UTC
``recorded_utc``), what (``action``: ``read_created``, ``read_revised``, or
``migrated`` for a read made before the trail), the read's content before
(``old_value``) and after (``new_value``) as canonical JSON
(:func:`read_content`), the ``reason`` for a revision, and the signature
(``signer``, ``meaning``, ``signed_utc``). The records are append-only and
hash-chained (``sha256`` over ``prev_sha256`` and the record,
:func:`trail_record_sha256`); :mod:`khe_vol.qa.verify` recomputes the chain.
A signed read is locked: its revision must be signed again and give a
reason (:class:`ReasonRequired`, :class:`SignatureRequired`).

A comment that should never have been written (one that unblinds) is
redacted by the core lab (:func:`redact_comment`, ``khe-vol qa redact``): a
``comment_redacted`` trail record names the read (reader, case, revision),
keeps the SHA-256 of the comment it hides (``old_value``), who redacted it and
why (``new_value``, ``reason``). The read's row is kept as it was (the chain
still vouches for it), but every read this module returns carries
:data:`REDACTED_COMMENT` instead, so no page, no audit and no report shows
the text again.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path

from khe_vol.qa import VERDICTS
from khe_vol.files import connect_private_db, private_db, write_transaction

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

#: The trail of every action on a read (module docstring). Not in :data:`SCHEMA`: a database
#: without this table is from before the trail, and :func:`_migrate_trail` creates it together with a
#: ``migrated`` record for each read it already holds, in one transaction.
TRAIL_STATEMENTS = (
    """CREATE TABLE IF NOT EXISTS trail (
    seq INTEGER PRIMARY KEY CHECK (seq >= 1),
    reader TEXT NOT NULL,
    recorded_utc TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('read_created', 'read_revised', 'migrated', 'comment_redacted')),
    case_code TEXT NOT NULL,
    revision INTEGER NOT NULL CHECK (revision >= 1),
    old_value TEXT,
    new_value TEXT NOT NULL,
    reason TEXT,
    signer TEXT,
    meaning TEXT,
    signed_utc TEXT,
    prev_sha256 TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    CHECK ((signer IS NULL) = (meaning IS NULL) AND (signer IS NULL) = (signed_utc IS NULL))
)""",
    """CREATE TRIGGER IF NOT EXISTS trail_append_only_update BEFORE UPDATE ON trail
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS trail_append_only_delete BEFORE DELETE ON trail
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END""",
    # A record joins the chain only at its end: the next seq, linked to the last record's hash.
    """CREATE TRIGGER IF NOT EXISTS trail_chained BEFORE INSERT ON trail
WHEN NEW.seq IS NOT (SELECT COALESCE(MAX(seq), 0) + 1 FROM trail)
  OR NEW.prev_sha256 IS NOT COALESCE((SELECT sha256 FROM trail ORDER BY seq DESC LIMIT 1), '""" + "0" * 64 + """')
BEGIN SELECT RAISE(ABORT, 'a trail record must extend the chain at its end'); END""",
)

#: ``prev_sha256`` of the first trail record.
GENESIS_SHA256 = "0" * 64

#: Trail actions: the first revision of a case, a later one, a read made before the trail existed,
#: and a comment hidden by the core lab (:func:`redact_comment`; not a revision of the read).
TRAIL_ACTIONS = ("read_created", "read_revised", "migrated", "comment_redacted")

#: Actions that record a read's content (a revision); ``comment_redacted`` does not.
READ_ACTIONS = ("read_created", "read_revised", "migrated")

#: What a redacted comment reads as, everywhere this module returns it.
REDACTED_COMMENT = "[comment removed by the core lab]"

#: Fields of a trail record covered by its ``sha256`` (every column but the hash itself).
TRAIL_HASHED_FIELDS = ("seq", "reader", "recorded_utc", "action", "case_code", "revision", "old_value", "new_value",
                       "reason", "signer", "meaning", "signed_utc", "prev_sha256")

#: The meaning of a reader's signature on a verdict.
SIGNATURE_MEANING = "read complete"

#: Longest reason for a revision, characters.
MAX_REASON_CHARS = 2000

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
    con = connect_private_db(db_path, SCHEMA)  # owner-only (0600) from its creation
    try:
        _set_up(con)
    except BaseException:
        con.close()
        raise
    return con


#: Indexes of the lookups a save makes (a case's revisions, its last trail record), so a save never
#: reads the whole table; created on open (``IF NOT EXISTS``: a database from before them gets them).
INDEX_STATEMENTS = (
    "CREATE INDEX IF NOT EXISTS reads_by_case ON reads (case_code, revision)",
    "CREATE INDEX IF NOT EXISTS trail_by_case ON trail (reader, case_code, revision, seq)",
)


def _set_up(con):
    """What opening a reads database does after its schema: the migrations and indexes (once per connection)."""
    _migrate(con)
    _migrate_trail(con)
    for statement in INDEX_STATEMENTS:
        con.execute(statement)


def _db(db_path):
    """A reads database for one use (:func:`khe_vol.files.private_db`: kept open by the service's pool)."""
    return private_db(Path(db_path), SCHEMA, _set_up)


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


def _has_trail(con):
    return con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'trail'").fetchone() is not None


def _migrate_trail(con, now=None):
    """Give a database from before the trail its ``trail`` table, with a ``migrated`` record per read it holds.

    Only when the table does not exist yet: a read added later without a
    trail record is a finding of :mod:`khe_vol.qa.verify`, never laundered
    into the chain here.
    """
    if _has_trail(con):
        return
    con.execute("BEGIN IMMEDIATE")
    try:
        if not _has_trail(con):  # another connection may have migrated between our look and the lock
            for statement in TRAIL_STATEMENTS:
                con.execute(statement)
            recorded = _utc_text(now, "milliseconds")
            for row in con.execute("SELECT * FROM reads ORDER BY id").fetchall():
                _append_trail(con, row["reader"], recorded, "migrated", row["case_code"], row["revision"], None,
                              read_content(dict(row)), reason=None, signer=None, meaning=None)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _utc_text(now, timespec):
    return (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec=timespec)


def canonical_json(value):
    """The one JSON text of ``value`` that is hashed and compared: sorted keys, no spaces, ASCII.

    Bytes (only in a tampered row) are written as their SHA-256, so any row has a text.
    """
    def _default(obj):
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return {"bytes_sha256": hashlib.sha256(bytes(obj)).hexdigest()}
        raise TypeError(f"{type(obj).__name__} is not JSON serialisable")

    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                      default=_default)


def read_content(row):
    """What a read says, as recorded in the trail: every column of its ``reads`` row, the mask as its SHA-256.

    Parameters
    ----------
    row : dict
        A ``reads`` row (``edited_mask`` gzip NIfTI bytes or None; ``clicks``
        JSON text, a list, or None).

    Returns
    -------
    dict
        ``reader``, ``case_code``, ``revision``, ``verdict``, ``comment``,
        ``edited_mask_sha256`` (None: no mask), ``edited_volume_ml`` (mL),
        ``proposed_mask_sha256``, ``created_utc``, ``clicks`` (list or None),
        ``seconds_to_verdict``, ``edit_seconds`` (s).
    """
    out = {k: row.get(k) for k in _COLUMNS if k not in ("edited_mask", "clicks")}
    mask = row.get("edited_mask")
    out["edited_mask_sha256"] = None if mask is None else hashlib.sha256(
        mask if isinstance(mask, bytes) else str(mask).encode("utf-8", "surrogateescape")).hexdigest()
    clicks = row.get("clicks")
    if isinstance(clicks, str):
        try:
            clicks = json.loads(clicks)
        except ValueError:
            pass  # a tampered text is kept as it is, so it differs from the trail's value
    out["clicks"] = clicks
    return out


def trail_record_sha256(record):
    """SHA-256 (hex) of a trail record: over its ``prev_sha256`` and the canonical JSON of its fields.

    Parameters
    ----------
    record : dict
        At least :data:`TRAIL_HASHED_FIELDS`.
    """
    body = canonical_json({k: record[k] for k in TRAIL_HASHED_FIELDS})
    return hashlib.sha256(f"{record['prev_sha256']}\n{body}".encode("utf-8", "surrogateescape")).hexdigest()


def _append_trail(con, reader, recorded_utc, action, case_code, revision, old_content, new_content, reason, signer,
                  meaning):
    """Insert the next trail record (inside the caller's write transaction) and return it."""
    last = con.execute("SELECT seq, sha256 FROM trail ORDER BY seq DESC LIMIT 1").fetchone()
    record = {
        "seq": 1 if last is None else last["seq"] + 1, "reader": reader, "recorded_utc": recorded_utc,
        "action": action, "case_code": case_code, "revision": revision,
        "old_value": None if old_content is None else canonical_json(old_content),
        "new_value": canonical_json(new_content), "reason": reason, "signer": signer, "meaning": meaning,
        "signed_utc": recorded_utc if signer is not None else None,
        "prev_sha256": GENESIS_SHA256 if last is None else last["sha256"]}
    record["sha256"] = trail_record_sha256(record)
    con.execute(f"INSERT INTO trail ({', '.join(record)}) VALUES ({', '.join('?' * len(record))})",
                tuple(record.values()))
    return record


def trail(db_path, case_code=None):
    """The trail records of a reads database (all, or one case's), oldest first.

    Returns
    -------
    list of dict
        The ``trail`` columns (module docstring); ``old_value`` and
        ``new_value`` as dicts (None: no old value). The reader app must not
        show their times to a reader.
    """
    db_path = Path(db_path)
    if not db_path.is_file():
        return []
    with _db(db_path) as con:
        if case_code is None:
            rows = con.execute("SELECT * FROM trail ORDER BY seq").fetchall()
        else:
            rows = con.execute("SELECT * FROM trail WHERE case_code = ? ORDER BY seq", (case_code,)).fetchall()
    out = []
    for row in rows:
        r = dict(row)
        r["old_value"] = None if r["old_value"] is None else json.loads(r["old_value"])
        r["new_value"] = json.loads(r["new_value"])
        out.append(r)
    return out


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
        three finite numbers (or a first box with six).
    """
    if clicks is None:
        return None
    items = []
    for n, c in enumerate(clicks):
        d = c.as_dict() if hasattr(c, "as_dict") else c
        if not isinstance(d, dict) or d.get("kind") not in ("include", "exclude", "box") or \
                (d.get("kind") == "box" and n > 0):
            raise ValueError("a stored click is {'kind': 'include' | 'exclude', 'ras_mm': [x, y, z]} (a first one may "
                             f"be {{'kind': 'box', 'ras_mm': [x0, y0, z0, x1, y1, z1]}}), not {d!r}")
        try:
            point = [float(v) for v in d["ras_mm"]]
        except (KeyError, TypeError, ValueError):
            point = []
        if len(point) != (6 if d["kind"] == "box" else 3) or not all(math.isfinite(v) for v in point):
            raise ValueError(f"a stored click's ras_mm is three finite numbers (six for a box), not {d.get('ras_mm')!r}")
        items.append({"kind": d["kind"], "ras_mm": point})
    if not items:
        raise ValueError("a read's clicks are None or at least one click")
    return json.dumps(items)


class ReasonRequired(ValueError):
    """A revision of a signed read without a reason (or a reason that is not text); nothing was stored."""


class SignatureRequired(ValueError):
    """A revision of a signed read that is not signed itself, or a signature that is not the reader's."""


def check_signature(reader, reason, signer, meaning):
    """Validate the reason and signature a read comes with (from the browser: hostile until checked).

    Returns
    -------
    (str or None, str or None, str or None)
        ``reason`` stripped (None: none given), ``signer``, ``meaning``
        (:data:`SIGNATURE_MEANING` when signed without one).

    Raises
    ------
    ReasonRequired
        A reason that is not text or longer than :data:`MAX_REASON_CHARS`.
    SignatureRequired
        A signer other than the reader, or a meaning without a signer.
    """
    if reason is not None and not isinstance(reason, str):
        raise ReasonRequired("a reason for a revision is text")
    reason = (reason or "").strip() or None
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        raise ReasonRequired(f"a reason for a revision has at most {MAX_REASON_CHARS} characters, not {len(reason)}")
    if signer is None:
        if meaning is not None:
            raise SignatureRequired("a signature's meaning goes with a signer")
        return reason, None, None
    if signer != reader:
        raise SignatureRequired(f"only the reader ({reader}) can sign their read, not {signer!r}")
    meaning = SIGNATURE_MEANING if meaning is None else str(meaning).strip()
    if not meaning:
        raise SignatureRequired("a signature has a meaning (e.g. 'read complete')")
    return reason, signer, meaning


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
                edit_seconds=None, reason=None, signer=None, meaning=None):
    """Append one read, as the next revision of its case, and its trail record, in one committed transaction.

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
    reason : str, optional
        Why the read is revised; required (:class:`ReasonRequired`) when the
        case's latest revision is signed, recorded in the trail whenever given.
    signer : str, optional
        The account that signed this read (the reader, having re-entered their
        password: the caller's check). A signed read is locked: its next
        revision must be signed too (:class:`SignatureRequired`) and give a reason.
    meaning : str, optional
        What the signature means (default :data:`SIGNATURE_MEANING` when signed).

    Returns
    -------
    dict
        The stored read (without the mask bytes; ``clicks`` as a list or None).

    Raises
    ------
    ValueError
        A bad verdict, mask, clicks or times; :class:`RevisionConflict`,
        :class:`ReasonRequired`, :class:`SignatureRequired` as above. Nothing
        is stored then.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
    if (verdict == "edited") != (edited_mask is not None):
        raise ValueError("an edited mask goes with, and only with, the verdict 'edited'")
    if clicks is not None and verdict != "edited":
        raise ValueError("clicks go only with the verdict 'edited' (the mask they make)")
    clicks_text = clicks_json(clicks)
    seconds_to_verdict, edit_seconds = check_read_seconds(seconds_to_verdict, edit_seconds, verdict)
    reason, signer, meaning = check_signature(reader, reason, signer, meaning)
    now = now or datetime.now(UTC)
    created = _utc_text(now, "seconds")
    # write_transaction takes the write lock (BEGIN IMMEDIATE) before the last revision is read.
    with write_transaction(db_path, SCHEMA, _set_up) as con:
        (last,) = con.execute("SELECT COALESCE(MAX(revision), 0) FROM reads WHERE reader = ? AND case_code = ?",
                              (reader, case_code)).fetchone()
        if expected_revision is not None and int(expected_revision) != last:
            raise RevisionConflict(case_code, int(expected_revision), last)
        previous = con.execute("SELECT new_value, signer FROM trail WHERE reader = ? AND case_code = ? "
                               "AND revision = ? AND action != 'comment_redacted' ORDER BY seq DESC LIMIT 1",
                               (reader, case_code, last)).fetchone()
        if previous is not None and previous["signer"] is not None:
            if signer is None:
                raise SignatureRequired(f"case {case_code} revision {last} is signed: a change is a new signed "
                                        "revision (re-enter your password)")
            if reason is None:
                raise ReasonRequired(f"case {case_code} revision {last} is signed: give the reason for the revision")
        values = (reader, case_code, last + 1, verdict, comment or "", edited_mask,
                  None if edited_volume_ml is None else float(edited_volume_ml), proposed_mask_sha256, created,
                  clicks_text, seconds_to_verdict, edit_seconds)
        con.execute(f"INSERT INTO reads ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", values)
        _append_trail(con, reader, _utc_text(now, "milliseconds"), "read_revised" if last else "read_created",
                      case_code, last + 1, None if previous is None else json.loads(previous["new_value"]),
                      read_content(dict(zip(_COLUMNS, values))), reason, signer, meaning)
    out = {k: v for k, v in zip(_COLUMNS, values) if k != "edited_mask"}
    out["clicks"] = None if clicks_text is None else json.loads(clicks_text)
    return out


def _rows(db_path, sql, params, with_masks):
    db_path = Path(db_path)
    if not db_path.is_file():
        return []
    # Without masks, the mask column is not even read (its pages are most of a database's bytes).
    columns = ", ".join(f"r.{c}" for c in _COLUMNS if with_masks or c != "edited_mask")
    with _db(db_path) as con:
        rows = [dict(r) for r in con.execute(sql.format(columns=columns), params)]
        redacted = _redacted(con)
    for r in rows:
        r.pop("id", None)
        if (r["reader"], r["case_code"], r["revision"]) in redacted:
            r["comment"] = REDACTED_COMMENT
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
    sql = """SELECT {columns} FROM reads r JOIN (
                 SELECT reader, case_code, MAX(revision) AS revision FROM reads GROUP BY reader, case_code
             ) last USING (reader, case_code, revision)
             ORDER BY r.reader, r.case_code"""
    return _rows(db_path, sql, (), with_masks)


def read_history(db_path, case_code, with_masks=False):
    """Every revision of one case, oldest first (same keys as :func:`current_reads`)."""
    sql = "SELECT {columns} FROM reads r WHERE case_code = ? ORDER BY reader, revision"
    return _rows(db_path, sql, (case_code,), with_masks)


def all_reads(db_path):
    """Every revision of every case, without masks, by reader, case and revision (same keys as :func:`current_reads`)."""
    return _rows(db_path, "SELECT {columns} FROM reads r ORDER BY reader, case_code, revision", (), False)


def edited_mask_bytes(db_path, case_code, revision):
    """The stored edited mask of one revision (gzip NIfTI bytes), or None."""
    rows = _rows(db_path, "SELECT {columns} FROM reads r WHERE case_code = ? AND revision = ?", (case_code, revision),
                 True)
    return rows[0]["edited_mask"] if rows else None


def _redacted(con):
    """``(reader, case_code, revision)`` of every redacted comment."""
    return {(r["reader"], r["case_code"], r["revision"]) for r in con.execute(
        "SELECT reader, case_code, revision FROM trail WHERE action = 'comment_redacted'")}


def _allow_redaction_records(con):
    """Let an older trail table take ``comment_redacted`` records (inside the caller's write transaction).

    SQLite cannot change a CHECK constraint, so the table is rebuilt with the
    current one and every record copied unchanged (same seq, values and
    hashes: :mod:`khe_vol.qa.verify` finds the same chain); its triggers and
    index are made again.
    """
    (sql,) = con.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'trail'").fetchone()
    if "comment_redacted" in sql:
        return
    con.execute(TRAIL_STATEMENTS[0].replace("CREATE TABLE IF NOT EXISTS trail (", "CREATE TABLE trail_upgraded (", 1))
    columns = ", ".join(("seq", *TRAIL_HASHED_FIELDS[1:], "sha256"))
    con.execute(f"INSERT INTO trail_upgraded ({columns}) SELECT {columns} FROM trail ORDER BY seq")
    con.execute("DROP TABLE trail")  # its triggers go with it (and fire no delete: SQLite drops them first)
    con.execute("ALTER TABLE trail_upgraded RENAME TO trail")
    for statement in TRAIL_STATEMENTS[1:] + INDEX_STATEMENTS[1:]:
        con.execute(statement)


def redact_comment(db_path, reader, case_code, revision, reason, redacted_by, now=None):
    """Hide one read's comment from everyone, keeping in the trail that it was there and who hid it.

    Parameters
    ----------
    db_path : path-like
    reader, case_code : str
    revision : int
        The revision whose comment is hidden.
    reason : str
        Why (e.g. "names an arm"); kept in the trail record, never shown to readers.
    redacted_by : str
        Who in the core lab redacts it.
    now : datetime, optional

    Returns
    -------
    dict
        The trail record written (``old_value``: the comment's SHA-256; ``new_value``: the
        replacement text and ``redacted_by``).

    Raises
    ------
    ValueError
        No such read, an empty comment, a comment already redacted, or no reason or name.
    """
    reason, redacted_by = str(reason or "").strip(), str(redacted_by or "").strip()
    if not reason or len(reason) > MAX_REASON_CHARS:
        raise ValueError(f"a redaction needs a reason (at most {MAX_REASON_CHARS} characters)")
    if not redacted_by:
        raise ValueError("a redaction names who makes it")
    db_path = Path(db_path)
    if not db_path.is_file():
        raise ValueError(f"{db_path}: no such reads database")
    with write_transaction(db_path, SCHEMA, _set_up) as con:
        row = con.execute("SELECT comment FROM reads WHERE reader = ? AND case_code = ? AND revision = ?",
                          (reader, case_code, int(revision))).fetchone()
        if row is None:
            raise ValueError(f"{db_path}: no read {case_code} revision {revision} of {reader}")
        if not row["comment"]:
            raise ValueError(f"{case_code} revision {revision} of {reader} has no comment to redact")
        if (reader, case_code, int(revision)) in _redacted(con):
            raise ValueError(f"the comment of {case_code} revision {revision} of {reader} is already redacted")
        _allow_redaction_records(con)
        digest = hashlib.sha256(row["comment"].encode("utf-8", "surrogateescape")).hexdigest()
        return _append_trail(con, reader, _utc_text(now, "milliseconds"), "comment_redacted", case_code,
                             int(revision), {"comment_sha256": digest},
                             {"comment": REDACTED_COMMENT, "redacted_by": redacted_by}, reason, None, None)
