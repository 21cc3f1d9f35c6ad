"""The reads store: append-only revisions in SQLite."""

from __future__ import annotations

import sqlite3

import pytest

from khe_vol.qa import store


def test_revisions_current_reads_and_history(tmp_path):
    db = tmp_path / "reads" / "R1.sqlite"
    assert store.current_reads(db) == []
    store.record_read(db, "R1", "AAAA", "accept", proposed_mask_sha256="s1")
    store.record_read(db, "R1", "BBBB", "edited", comment="cut the vessel", edited_mask=b"\x1f\x8bmask",
                      edited_volume_ml=1.5, proposed_mask_sha256="s2")
    second = store.record_read(db, "R1", "AAAA", "reject", comment="motion")
    assert second["revision"] == 2
    current = {r["case_code"]: r for r in store.current_reads(db)}
    assert current["AAAA"]["verdict"] == "reject" and current["AAAA"]["revision"] == 2
    assert current["BBBB"]["edited_mask"] == b"\x1f\x8bmask" and current["BBBB"]["edited_volume_ml"] == 1.5
    history = store.read_history(db, "AAAA")
    assert [(h["revision"], h["verdict"], h["proposed_mask_sha256"]) for h in history] == [
        (1, "accept", "s1"), (2, "reject", None)]
    assert store.edited_mask_bytes(db, "BBBB", 1) == b"\x1f\x8bmask"


def test_reads_are_append_only_and_checked(tmp_path):
    db = tmp_path / "R1.sqlite"
    store.record_read(db, "R1", "AAAA", "accept")
    with pytest.raises(ValueError):
        store.record_read(db, "R1", "AAAA", "maybe")
    with pytest.raises(ValueError):
        store.record_read(db, "R1", "AAAA", "edited")  # an edit needs its mask
    con = sqlite3.connect(db)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE reads SET verdict = 'reject'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM reads")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    assert len(store.read_history(db, "AAAA")) == 1


def test_clicks_are_stored_in_order_with_the_edited_read(tmp_path):
    db = tmp_path / "R1.sqlite"
    clicks = [{"kind": "include", "ras_mm": [1.25, -3.0, 0.1]}, {"kind": "exclude", "ras_mm": [2, 4, -6.000001]},
              {"kind": "include", "ras_mm": [0.30000000000000004, 1e-7, 5.5]}]
    stored = store.record_read(db, "R1", "AAAA", "edited", edited_mask=b"\x1f\x8bm", edited_volume_ml=1.0,
                               clicks=clicks)
    store.record_read(db, "R1", "BBBB", "accept")
    expected = [{"kind": c["kind"], "ras_mm": [float(v) for v in c["ras_mm"]]} for c in clicks]
    assert stored["clicks"] == expected
    current = {r["case_code"]: r for r in store.current_reads(db)}
    assert current["AAAA"]["clicks"] == expected  # floats read back exactly, order kept
    assert current["BBBB"]["clicks"] is None
    assert store.read_history(db, "AAAA")[0]["clicks"] == expected
    with pytest.raises(ValueError, match="only with the verdict 'edited'"):
        store.record_read(db, "R1", "AAAA", "accept", clicks=clicks)
    for bad in ([], [{"kind": "maybe", "ras_mm": [0, 0, 0]}], [{"kind": "include", "ras_mm": [0, float("nan"), 0]}],
                [{"kind": "include", "ras_mm": [0, 0]}], [{"kind": "include"}]):
        with pytest.raises(ValueError):
            store.record_read(db, "R1", "AAAA", "edited", edited_mask=b"m", clicks=bad)
    assert len(store.read_history(db, "AAAA")) == 1  # nothing half-written


def test_a_database_from_before_clicks_opens_and_keeps_its_reads(tmp_path):
    db = tmp_path / "old.sqlite"
    # The schema as released before the clicks column, with two reads in it.
    con = sqlite3.connect(db)
    con.executescript("""
CREATE TABLE reads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reader TEXT NOT NULL,
    case_code TEXT NOT NULL,
    revision INTEGER NOT NULL CHECK (revision >= 1),
    verdict TEXT NOT NULL CHECK (verdict IN ('accept', 'edited', 'reject', 'no_residual_lesion')),
    comment TEXT NOT NULL DEFAULT '',
    edited_mask BLOB,
    edited_volume_ml REAL,
    proposed_mask_sha256 TEXT,
    created_utc TEXT NOT NULL,
    UNIQUE (reader, case_code, revision),
    CHECK ((verdict = 'edited') = (edited_mask IS NOT NULL))
);
CREATE TRIGGER reads_append_only_update BEFORE UPDATE ON reads
BEGIN SELECT RAISE(ABORT, 'reads are append-only: add a revision instead'); END;
CREATE TRIGGER reads_append_only_delete BEFORE DELETE ON reads
BEGIN SELECT RAISE(ABORT, 'reads are append-only: add a revision instead'); END;
INSERT INTO reads (reader, case_code, revision, verdict, comment, edited_mask, edited_volume_ml,
                   proposed_mask_sha256, created_utc)
VALUES ('R1', 'AAAA', 1, 'accept', 'fine', NULL, NULL, 's1', '2026-01-01T00:00:00+00:00'),
       ('R1', 'BBBB', 1, 'edited', '', X'1f8b00', 2.5, 's2', '2026-01-01T00:00:01+00:00');
""")
    con.commit()
    con.close()
    current = {r["case_code"]: r for r in store.current_reads(db)}
    assert {c: (r["verdict"], r["comment"], r["edited_mask"], r["edited_volume_ml"], r["proposed_mask_sha256"],
                r["clicks"]) for c, r in current.items()} == {
        "AAAA": ("accept", "fine", None, None, "s1", None), "BBBB": ("edited", "", b"\x1f\x8b\x00", 2.5, "s2", None)}
    # The migrated database takes clicked reads and stays append-only.
    click = [{"kind": "include", "ras_mm": [1.0, 2.0, 3.0]}]
    assert store.record_read(db, "R1", "AAAA", "edited", edited_mask=b"m", clicks=click)["revision"] == 2
    assert store.read_history(db, "AAAA")[-1]["clicks"] == click
    con = sqlite3.connect(db)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE reads SET clicks = NULL")
    con.close()
    store.connect(db).close()  # opening again changes nothing
    assert len(store.current_reads(db)) == 2


def test_read_times_are_stored_checked_and_kept_with_the_read(tmp_path):
    db = tmp_path / "reads.sqlite"
    first = store.record_read(db, "R1", "AAAA", "edited", edited_mask=b"m", seconds_to_verdict="83.25",
                              edit_seconds=41.5)
    assert (first["seconds_to_verdict"], first["edit_seconds"]) == (83.25, 41.5)
    # An edit time goes only with an edited read; a time over the cap is a case left open, kept as unknown.
    store.record_read(db, "R1", "BBBB", "accept", seconds_to_verdict=12.0, edit_seconds=3.0)
    store.record_read(db, "R1", "CCCC", "accept", seconds_to_verdict=store.MAX_READ_SECONDS + 1)
    store.record_read(db, "R1", "DDDD", "reject")
    current = {r["case_code"]: (r["seconds_to_verdict"], r["edit_seconds"]) for r in store.current_reads(db)}
    assert current == {"AAAA": (83.25, 41.5), "BBBB": (12.0, None), "CCCC": (None, None), "DDDD": (None, None)}
    for total, edit, match in [("nan", None, "finite"), (-1, None, "non-negative"), ("inf", None, "finite"),
                               ("soon", None, "number"), (10, 11, "cannot exceed"), (5, -2, "non-negative")]:
        with pytest.raises(ValueError, match=match):
            store.record_read(db, "R1", "AAAA", "edited", edited_mask=b"m", seconds_to_verdict=total,
                              edit_seconds=edit)
    assert len(store.read_history(db, "AAAA")) == 1  # nothing half-written
    con = sqlite3.connect(db)
    with pytest.raises(sqlite3.IntegrityError):  # the database refuses a negative time of its own accord
        con.execute("INSERT INTO reads (reader, case_code, revision, verdict, created_utc, seconds_to_verdict) "
                    "VALUES ('R1', 'EEEE', 1, 'accept', 'x', -1)")
    con.close()


def test_a_database_from_before_read_times_opens_and_keeps_its_reads(tmp_path):
    db = tmp_path / "old.sqlite"
    # The schema as released with clicks but before the read times, with a read in it.
    con = sqlite3.connect(db)
    con.executescript("""
CREATE TABLE reads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reader TEXT NOT NULL,
    case_code TEXT NOT NULL,
    revision INTEGER NOT NULL CHECK (revision >= 1),
    verdict TEXT NOT NULL CHECK (verdict IN ('accept', 'edited', 'reject', 'no_residual_lesion')),
    comment TEXT NOT NULL DEFAULT '',
    edited_mask BLOB,
    edited_volume_ml REAL,
    proposed_mask_sha256 TEXT,
    created_utc TEXT NOT NULL,
    clicks TEXT,
    UNIQUE (reader, case_code, revision),
    CHECK ((verdict = 'edited') = (edited_mask IS NOT NULL))
);
CREATE TRIGGER reads_append_only_update BEFORE UPDATE ON reads
BEGIN SELECT RAISE(ABORT, 'reads are append-only: add a revision instead'); END;
INSERT INTO reads (reader, case_code, revision, verdict, comment, created_utc, clicks)
VALUES ('R1', 'AAAA', 1, 'accept', 'fine', '2026-01-01T00:00:00+00:00', NULL);
""")
    con.commit()
    con.close()
    (old,) = store.current_reads(db)
    assert (old["verdict"], old["comment"], old["seconds_to_verdict"], old["edit_seconds"]) == ("accept", "fine", None, None)
    assert store.record_read(db, "R1", "AAAA", "reject", seconds_to_verdict=7.5)["revision"] == 2
    assert [(r["revision"], r["seconds_to_verdict"]) for r in store.all_reads(db)] == [(1, None), (2, 7.5)]
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        sqlite3.connect(db).execute("UPDATE reads SET seconds_to_verdict = 1")
