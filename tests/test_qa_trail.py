"""The audit trail of the reads store and `khe-vol qa verify`: real SQLite files, altered on disk."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import threading
from datetime import UTC, datetime

import pytest

from khe_vol.cli import main
from khe_vol.qa import accounts, store
from khe_vol.qa.leaks import DATE_RE
from khe_vol.qa.verify import verify_database, verify_rows
from tests.test_qa_service import two_readers  # noqa: F401 - the fixture: packages and accounts for R1, R2

T0 = datetime(2026, 3, 1, 9, 30, 0, tzinfo=UTC)


def _reads_db(results):
    return results / "reads" / "R1.sqlite"


def _verify_cli(results, capsys):
    code = main(["qa", "verify", "--results-dir", str(results)])
    out = capsys.readouterr()
    return code, out.out + out.err


def _write_three_reads(db):
    store.record_read(db, "R1", "AAAA", "accept", comment="fine", proposed_mask_sha256="s1", now=T0)
    store.record_read(db, "R1", "BBBB", "reject", comment="qzxv motion marker", now=T0, signer="R1")
    store.record_read(db, "R1", "CCCC", "edited", edited_mask=b"\x1f\x8bmask-bytes", edited_volume_ml=2.5,
                      clicks=[{"kind": "include", "ras_mm": [1.5, -2.0, 3.25]}], seconds_to_verdict=40.0,
                      edit_seconds=12.5, now=T0)


def test_each_read_writes_a_chained_trail_record_in_its_transaction(tmp_path, capsys):
    db = _reads_db(tmp_path)
    _write_three_reads(db)
    store.record_read(db, "R1", "AAAA", "reject", comment="artefact", reason="saw the motion on review", now=T0)
    records = store.trail(db)
    assert [(r["seq"], r["reader"], r["action"], r["case_code"], r["revision"]) for r in records] == [
        (1, "R1", "read_created", "AAAA", 1), (2, "R1", "read_created", "BBBB", 1),
        (3, "R1", "read_created", "CCCC", 1), (4, "R1", "read_revised", "AAAA", 2)]
    assert records[0]["prev_sha256"] == "0" * 64
    assert all(b["prev_sha256"] == a["sha256"] for a, b in zip(records, records[1:]))
    assert all(r["recorded_utc"] == "2026-03-01T09:30:00.000+00:00" for r in records)  # server UTC time
    # Old and new value: the read's whole content, the mask as its SHA-256.
    revised = records[3]
    assert revised["old_value"]["verdict"] == "accept" and revised["old_value"]["comment"] == "fine"
    assert revised["new_value"]["verdict"] == "reject" and revised["new_value"]["comment"] == "artefact"
    assert revised["reason"] == "saw the motion on review" and revised["signer"] is None
    edited = records[2]["new_value"]
    assert edited["edited_mask_sha256"] == hashlib.sha256(b"\x1f\x8bmask-bytes").hexdigest()
    assert (edited["edited_volume_ml"], edited["seconds_to_verdict"], edited["edit_seconds"]) == (2.5, 40.0, 12.5)
    assert edited["clicks"] == [{"kind": "include", "ras_mm": [1.5, -2.0, 3.25]}]
    assert records[0]["old_value"] is None
    signed = records[1]
    assert (signed["signer"], signed["meaning"], signed["signed_utc"]) == ("R1", "read complete",
                                                                          "2026-03-01T09:30:00.000+00:00")
    # A read refused by the store leaves no trail record.
    with pytest.raises(store.RevisionConflict):
        store.record_read(db, "R1", "AAAA", "accept", expected_revision=1)
    with pytest.raises(ValueError):
        store.record_read(db, "R1", "DDDD", "edited")
    assert len(store.trail(db)) == 4
    code, text = _verify_cli(tmp_path, capsys)
    assert code == 0, text
    assert "4 trail record(s), 4 read(s), 1 signed" in text and records[3]["sha256"] in text


def test_a_signed_read_is_locked_its_revision_is_signed_with_a_reason(tmp_path):
    db = tmp_path / "R1.sqlite"
    store.record_read(db, "R1", "AAAA", "accept", signer="R1", meaning="read complete")
    with pytest.raises(store.ReasonRequired, match="give the reason"):
        store.record_read(db, "R1", "AAAA", "reject", signer="R1")
    with pytest.raises(store.ReasonRequired):
        store.record_read(db, "R1", "AAAA", "reject", signer="R1", reason="   ")
    with pytest.raises(store.SignatureRequired, match="signed revision"):
        store.record_read(db, "R1", "AAAA", "reject", reason="motion")
    with pytest.raises(store.SignatureRequired, match="only the reader"):
        store.record_read(db, "R1", "AAAA", "reject", signer="R2", reason="motion")
    with pytest.raises(store.SignatureRequired, match="meaning goes with a signer"):
        store.record_read(db, "R1", "BBBB", "accept", meaning="read complete")
    with pytest.raises(store.ReasonRequired, match="at most"):
        store.record_read(db, "R1", "AAAA", "reject", signer="R1", reason="x" * (store.MAX_REASON_CHARS + 1))
    assert issubclass(store.ReasonRequired, ValueError) and issubclass(store.SignatureRequired, ValueError)
    assert [r["revision"] for r in store.all_reads(db)] == [1] and len(store.trail(db)) == 1  # nothing stored
    stored = store.record_read(db, "R1", "AAAA", "reject", signer="R1", reason=" motion in the last slices ")
    assert stored["revision"] == 2
    last = store.trail(db)[-1]
    assert (last["action"], last["reason"], last["signer"], last["meaning"]) == (
        "read_revised", "motion in the last slices", "R1", "read complete")
    # An unsigned read stays revisable without a reason (the single-reader local app does not sign).
    store.record_read(db, "R1", "BBBB", "accept")
    store.record_read(db, "R1", "BBBB", "reject")
    assert verify_database(db).ok


def test_the_trail_is_append_only_and_extended_only_at_its_end(tmp_path):
    db = tmp_path / "R1.sqlite"
    _write_three_reads(db)
    con = sqlite3.connect(db)
    for sql in ("UPDATE trail SET reason = 'x'", "DELETE FROM trail WHERE seq = 3"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute(sql)
    first = dict(zip(["seq", "sha256"], con.execute("SELECT seq, sha256 FROM trail WHERE seq = 1").fetchone()))
    for seq, prev in ((3, first["sha256"]), (4, first["sha256"]), (9, "0" * 64)):
        with pytest.raises(sqlite3.DatabaseError, match="extend the chain"):
            con.execute("INSERT INTO trail (seq, reader, recorded_utc, action, case_code, revision, new_value, "
                        "prev_sha256, sha256) VALUES (?, 'R1', 't', 'read_created', 'ZZZZ', 1, '{}', ?, ?)",
                        (seq, prev, f"h{seq}"))
    con.close()
    assert verify_database(db).ok


def _flip_one_byte_in_file(db, needle, occurrence):
    """Change one byte of the ``occurrence``-th copy of ``needle`` in the database file itself."""
    data = bytearray(db.read_bytes())
    positions = []
    start = data.find(needle)
    while start >= 0:
        positions.append(start)
        start = data.find(needle, start + 1)
    at = positions[occurrence] + 1
    data[at] ^= 0x01  # 'z' -> '{': still one ASCII byte, so SQLite reads the page as before
    db.write_bytes(bytes(data))
    return len(positions)


def test_a_byte_flipped_in_the_database_file_names_the_altered_record(tmp_path, capsys):
    clean = tmp_path / "clean"
    _write_three_reads(_reads_db(clean))
    wal = _reads_db(clean).with_name("R1.sqlite-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # every read is in the main file
    assert _verify_cli(clean, capsys)[0] == 0
    needle = b"qzxv motion marker"
    messages = []
    for occurrence in (0, 1):  # the read's row and its trail record (in page order, whichever comes first)
        results = tmp_path / f"flip{occurrence}"
        shutil.copytree(clean, results)
        before = _reads_db(results).read_bytes()
        assert _flip_one_byte_in_file(_reads_db(results), needle, occurrence) == 2
        code, text = _verify_cli(results, capsys)
        assert code == 1, text
        assert "first altered record: seq 2" in text and "R1.sqlite" in text
        messages.append(text)
        assert _reads_db(results).read_bytes() != before  # (the flip happened) ...
        flipped = _reads_db(results).read_bytes()
        verify_database(_reads_db(results))
        assert _reads_db(results).read_bytes() == flipped  # ... and verifying never writes the file
    joined = "\n".join(messages)
    assert "trail record 2 was altered: its SHA-256 does not match its content" in joined
    assert "read BBBB revision 1 of R1 differs from trail record 2 in: comment" in joined


def _con_without_triggers(db, *names):
    con = sqlite3.connect(db, isolation_level=None)
    for name in names:
        con.execute(f"DROP TRIGGER {name}")
    return con


def test_edits_made_in_sql_with_the_triggers_dropped_are_named(tmp_path):
    for case, edit, expected_seq, expected in [
        ("read changed", "UPDATE reads SET verdict = 'accept', comment = '' WHERE case_code = 'BBBB'", 2,
         "differs from trail record 2 in: comment, verdict"),
        ("mask swapped", "UPDATE reads SET edited_mask = X'1f8b00' WHERE case_code = 'CCCC'", 3,
         "differs from trail record 3 in: edited_mask_sha256"),
        ("read deleted", "DELETE FROM reads WHERE case_code = 'AAAA'", 1, "not in the database (deleted)"),
        ("record rewritten", "UPDATE trail SET reason = 'because' WHERE seq = 2", 2, "trail record 2 was altered"),
        ("record removed", "DELETE FROM trail WHERE seq = 2", 3, "trail record 3 does not link to the record before"),
    ]:
        db = tmp_path / case / "R1.sqlite"
        _write_three_reads(db)
        con = _con_without_triggers(db, "reads_append_only_update", "reads_append_only_delete",
                                    "trail_append_only_update", "trail_append_only_delete")
        con.execute(edit)
        con.close()
        result = verify_database(db)
        assert not result.ok and result.first_altered == expected_seq, (case, result.findings)
        assert any(expected in f.message for f in result.findings), (case, result.findings)
    # A read inserted behind the store's back is vouched for by no record, and reopening never adopts it.
    db = tmp_path / "inserted" / "R1.sqlite"
    _write_three_reads(db)
    con = sqlite3.connect(db)
    con.execute("INSERT INTO reads (reader, case_code, revision, verdict, comment, created_utc) "
                "VALUES ('R1', 'DDDD', 1, 'accept', '', '2026-03-01T09:30:00+00:00')")
    con.commit()
    con.close()
    store.connect(db).close()
    result = verify_database(db)
    assert [f.message for f in result.findings] == [
        "read DDDD revision 1 of R1 is vouched for by no trail record: it was added outside the reads store"]
    # A record rewritten with its hash recomputed breaks the next record's link.
    db = tmp_path / "rehashed" / "R1.sqlite"
    _write_three_reads(db)
    con = _con_without_triggers(db, "trail_append_only_update")
    con.row_factory = sqlite3.Row
    rec = dict(con.execute("SELECT * FROM trail WHERE seq = 1").fetchone())
    rec["reason"] = "backdated"
    con.execute("UPDATE trail SET reason = ?, sha256 = ? WHERE seq = 1", (rec["reason"], store.trail_record_sha256(rec)))
    con.close()
    result = verify_database(db)
    assert result.first_altered == 2 and "trail record 2 does not link" in result.findings[0].message


def test_a_database_from_before_the_trail_gets_a_migrated_record_per_read(tmp_path, capsys):
    results = tmp_path / "results"
    db = _reads_db(results)
    db.parent.mkdir(parents=True)
    # The schema as released before the trail (with clicks and read times), with three reads in it.
    con = sqlite3.connect(db)
    con.executescript(store.SCHEMA)
    con.executescript("""
INSERT INTO reads (reader, case_code, revision, verdict, comment, edited_mask, edited_volume_ml, created_utc)
VALUES ('R1', 'AAAA', 1, 'accept', 'fine', NULL, NULL, '2026-01-01T00:00:00+00:00'),
       ('R1', 'AAAA', 2, 'edited', 'rim', X'1f8b00', 2.5, '2026-01-01T00:00:01+00:00'),
       ('R1', 'BBBB', 1, 'reject', '', NULL, NULL, '2026-01-01T00:00:02+00:00');
""")
    con.commit()
    con.close()
    before = db.read_bytes()
    # `qa verify` reads it without changing it, and says why it cannot vouch for it.
    code, text = _verify_cli(results, capsys)
    assert code == 1 and "no audit trail" in text
    assert db.read_bytes() == before
    store.connect(db).close()
    records = store.trail(db)
    assert [(r["action"], r["case_code"], r["revision"], r["signer"], r["old_value"]) for r in records] == [
        ("migrated", "AAAA", 1, None, None), ("migrated", "AAAA", 2, None, None), ("migrated", "BBBB", 1, None, None)]
    assert records[1]["new_value"]["edited_mask_sha256"] == hashlib.sha256(b"\x1f\x8b\x00").hexdigest()
    store.connect(db).close()  # opening again adds nothing
    assert len(store.trail(db)) == 3
    revised = store.record_read(db, "R1", "BBBB", "accept", reason="second look")
    assert revised["revision"] == 2
    last = store.trail(db)[-1]
    assert last["old_value"]["verdict"] == "reject" and last["action"] == "read_revised"
    code, text = _verify_cli(results, capsys)
    assert code == 0, text


def test_verify_skips_the_accounts_database_and_checks_every_reader(tmp_path, capsys):
    accounts.add_account(accounts.default_accounts_path(tmp_path), "R1")
    assert _verify_cli(tmp_path, capsys)[0] == 2  # no reads database at all
    store.record_read(tmp_path / "reads" / "R1.sqlite", "R1", "AAAA", "accept")
    store.record_read(tmp_path / "reads" / "ADJ.sqlite", "ADJ", "AAAA", "reject", signer="ADJ")
    code, text = _verify_cli(tmp_path, capsys)
    assert code == 0 and "2 reads database(s) verified" in text and "accounts.sqlite" not in text
    con = _con_without_triggers(tmp_path / "reads" / "ADJ.sqlite", "reads_append_only_update")
    con.execute("UPDATE reads SET comment = 'x'")
    con.close()
    code, text = _verify_cli(tmp_path, capsys)
    assert code == 1 and "ADJ.sqlite: FAILED" in text and "R1.sqlite: ok" in text
    assert "1 of 2 reads database(s) failed" in text


def test_concurrent_writers_keep_one_valid_chain(tmp_path):
    db = tmp_path / "R1.sqlite"
    store.connect(db).close()
    errors = []

    def write(worker):
        try:
            for i in range(8):
                store.record_read(db, "R1", f"C{worker}{i:02d}", "accept", signer="R1")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    result = verify_database(db)
    assert result.ok and result.records == result.reads == 32


def test_verify_rows_is_a_pure_check_of_rows():
    assert verify_rows([], []).ok
    row = {"reader": "R1", "case_code": "AAAA", "revision": 1, "verdict": "accept", "comment": "",
           "edited_mask": None, "edited_volume_ml": None, "proposed_mask_sha256": None,
           "created_utc": "2026-01-01T00:00:00+00:00", "clicks": None, "seconds_to_verdict": None,
           "edit_seconds": None}
    rec = {"seq": 1, "reader": "R1", "recorded_utc": "t", "action": "read_created", "case_code": "AAAA",
           "revision": 1, "old_value": None, "new_value": store.canonical_json(store.read_content(row)),
           "reason": None, "signer": None, "meaning": None, "signed_utc": None, "prev_sha256": "0" * 64}
    rec["sha256"] = store.trail_record_sha256(rec)
    assert verify_rows([rec], [row]).ok
    assert verify_rows([dict(rec, action="read_revised")], [row]).first_altered == 1
    assert verify_rows([rec], [dict(row, comment="\udcff")]).first_altered == 1  # undecodable text is named too
    assert verify_rows([rec], []).findings[0].message.endswith("(deleted)")


def test_a_read_whose_trail_record_cannot_be_written_is_not_stored(tmp_path):
    db = tmp_path / "R1.sqlite"
    store.record_read(db, "R1", "AAAA", "accept")
    con = sqlite3.connect(db)
    con.execute("CREATE TRIGGER trail_full BEFORE INSERT ON trail BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    con.commit()
    con.close()
    with pytest.raises(sqlite3.DatabaseError, match="disk full"):
        store.record_read(db, "R1", "BBBB", "reject")
    assert [r["case_code"] for r in store.all_reads(db)] == ["AAAA"]  # the read went with its record
    assert verify_database(db).ok


def test_reads_signed_through_the_service_are_in_the_trail_and_verify(two_readers, capsys):
    """The service's signed verdict (password re-entered) and its revision with a reason, as the trail records them."""
    from tests.test_qa_service import PASSWORDS, client_for, csrf_of, login, post_read

    results, codes = two_readers
    client = client_for(results)
    code = codes["R1"][("sub-01", "ses-baseline")]
    login(client, "R1")
    csrf = csrf_of(client)
    assert post_read(client, code, csrf, verdict="accept", expected_revision="0",
                     password=PASSWORDS["R1"]).status_code == 200
    assert post_read(client, code, csrf, verdict="reject", expected_revision="1", password=PASSWORDS["R1"],
                     reason="motion on second look").status_code == 200
    records = store.trail(results / "reads" / "R1.sqlite", code)
    assert [(r["action"], r["revision"], r["signer"], r["meaning"], r["reason"]) for r in records] == [
        ("read_created", 1, "R1", "read complete", None), ("read_revised", 2, "R1", "read complete",
                                                           "motion on second look")]
    assert records[1]["old_value"]["verdict"] == "accept" and records[1]["new_value"]["verdict"] == "reject"
    # The store itself refuses an unsigned or unexplained change of the signed read, whoever calls it.
    with pytest.raises(store.SignatureRequired):
        store.record_read(results / "reads" / "R1.sqlite", "R1", code, "accept", reason="x")
    code_, text = _verify_cli(results, capsys)
    assert code_ == 0 and "R1.sqlite: ok: 2 trail record(s), 2 read(s), 2 signed" in text, text
    # What R1's pages show of the signed reads carries no time (the audit scans every page for dates).
    pages = "".join(client.get(url, base_url="http://127.0.0.1").get_data(as_text=True)
                    for url in ("/", f"/case/{code}", "/api/worklist", f"/api/case/{code}"))
    assert pages.count("reject") and not DATE_RE.search(pages), DATE_RE.search(pages)
    assert main(["qa", "audit", "--results-dir", str(results)]) == 0
