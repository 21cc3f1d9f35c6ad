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
