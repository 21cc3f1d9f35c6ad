"""Kept database connections (:class:`khe_vol.files.ConnectionPool`, used by ``khe-vol qa serve``).

The pool must change nothing a reader relies on: two threads saving to one reader's database
never lose or duplicate a read, a file replaced behind the pool is read afresh, and a server
SIGKILLed while readers save keeps every read it acknowledged (and the trail verifies).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest
import requests

from khe_vol import files
from khe_vol.cli import main
from khe_vol.qa import default_db_path, store
from khe_vol.qa.verify import verify_database
from tests.test_qa_app import free_port, kill_hard, start_server
from tests.test_qa_service import PASSWORDS, two_readers  # noqa: F401 - the fixture
from tests.test_qa_signing import Reader


@pytest.fixture
def pooled(monkeypatch):
    """Connections kept (as in the service) for the test, counting how many are opened."""
    opened = []
    real = files.connect_private_db

    def counting(path, schema):
        opened.append(str(path))
        return real(path, schema)

    monkeypatch.setattr(files, "connect_private_db", counting)
    previous = files.reuse_connections()
    try:
        yield opened
    finally:
        files.reuse_connections(False)
        if previous is not None:
            files.reuse_connections(previous)


def test_two_threads_saving_to_one_database_never_lose_or_duplicate_a_read(tmp_path, pooled):
    db = tmp_path / "R1.sqlite"
    per_thread, errors, saved = 25, [], {}

    def save_all(name):
        try:
            for i in range(per_thread):
                token = f"{name}-{i:02d}"
                while True:  # both threads revise the same case: a stale revision is refused, then retried
                    latest = max((r["revision"] for r in store.read_history(db, "AAAA")), default=0)
                    try:
                        out = store.record_read(db, "R1", "AAAA", ("accept", "reject")[i % 2], comment=token,
                                                expected_revision=latest, signer="R1",
                                                reason=f"look {token}" if latest else None)
                    except store.RevisionConflict:
                        continue
                    saved[token] = out["revision"]
                    break
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=save_all, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    rows = store.all_reads(db)
    assert sorted(r["comment"] for r in rows) == sorted(saved) and len(saved) == 2 * per_thread
    assert [r["revision"] for r in rows] == list(range(1, 2 * per_thread + 1))  # one read per revision
    assert {r["comment"]: r["revision"] for r in rows} == saved  # each as acknowledged
    assert verify_database(db).ok and len(store.trail(db)) == 2 * per_thread
    assert 1 <= pooled.count(str(db)) <= 2  # opened once per thread at most, not once per query


def test_a_database_replaced_behind_the_pool_is_read_afresh(tmp_path, pooled):
    db, other = tmp_path / "R1.sqlite", tmp_path / "other.sqlite"
    files.reuse_connections(False)
    store.record_read(other, "R1", "BBBB", "reject", comment="second file")  # closed: all in the main file
    files.reuse_connections()
    store.record_read(db, "R1", "AAAA", "accept", comment="first file")
    assert [r["comment"] for r in store.current_reads(db)] == ["first file"]
    opened = pooled.count(str(db))
    for path in (db, db.with_name("R1.sqlite-wal"), db.with_name("R1.sqlite-shm")):
        path.unlink(missing_ok=True)
    shutil.copy(other, db)  # another file (inode) at the same path, while the pool keeps the old one open
    assert [r["comment"] for r in store.current_reads(db)] == ["second file"]
    assert pooled.count(str(db)) == opened + 1
    assert verify_database(db).ok


class _Saver(threading.Thread):
    """Saves signed reads of one case back to back through the real server, retrying across a restart."""

    def __init__(self, base, account, code, n, acked):
        super().__init__(daemon=True)
        self.reader, self.code, self.n, self.acked = Reader(base, account), code, n, acked
        self.errors = []

    def run(self):
        try:
            assert self.reader.login().status_code == 303
            revision = 0
            for i in range(self.n):
                token = f"{self.reader.account} {self.code} read {'abcdefghijklmnopqrstuvwxyz'[i]}"  # no digits: no date
                fields = {"comment": token} | ({"reason": f"again {token}"} if revision else {})
                revision = self._save(token, revision, fields)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(exc))

    def _save(self, token, revision, fields):
        failed, started = False, time.monotonic()
        while time.monotonic() - started < 60:
            try:
                answer = self.reader.sign(self.code, PASSWORDS[self.reader.account], revision, **fields)
            except requests.RequestException:
                failed = True  # the server is down: the same read again, same expected revision
                time.sleep(0.1)
                continue
            if answer.status_code == 200:
                self.acked.append((token, self.reader.account, self.code, answer.json()["revision"]))
                return revision + 1
            if answer.status_code == 409 and failed:
                return revision + 1  # stored before the kill, its answer lost: never stored twice
            if answer.status_code == 401:
                assert self.reader.login().status_code == 303
                continue
            raise AssertionError(f"{token}: HTTP {answer.status_code}: {answer.text[:200]}")
        raise AssertionError(f"{token}: not saved within 60 s")


def test_a_server_killed_while_readers_save_keeps_every_acknowledged_read(two_readers, tmp_path):  # noqa: F811
    results, codes = two_readers
    r1 = sorted(codes["R1"].values())
    port = free_port()
    acked = []
    savers = [_Saver(f"http://127.0.0.1:{port}", "R1", r1[0], 12, acked),  # two threads on R1's database
              _Saver(f"http://127.0.0.1:{port}", "R1", r1[1], 12, acked),
              _Saver(f"http://127.0.0.1:{port}", "R2", sorted(codes["R2"].values())[0], 12, acked)]
    with open(tmp_path / "service.log", "w") as log:
        proc = start_server(results, port, log)
        try:
            for s in savers:
                s.start()
            deadline = time.monotonic() + 60
            while len(acked) < 12 and time.monotonic() < deadline:
                time.sleep(0.01)
            kill_hard(proc)  # SIGKILL while the savers are mid-way
            assert len(acked) < 36
            proc = start_server(results, port, log)
            for s in savers:
                s.join(timeout=120)
        finally:
            kill_hard(proc)
    assert [e for s in savers for e in s.errors] == []
    stored = {}
    for account in ("R1", "R2"):
        for row in store.all_reads(default_db_path(results, account)):
            stored.setdefault(row["comment"], []).append((row["reader"], row["case_code"], row["revision"]))
    assert len(stored) == 36 and all(len(rows) == 1 for rows in stored.values())  # none lost, none twice
    for token, account, code, revision in acked:
        assert stored[token] == [(account, code, revision)]
    assert main(["qa", "verify", "--results-dir", str(results)]) == 0


def test_a_server_stopped_by_sigterm_leaves_every_read_in_the_main_file(two_readers, tmp_path):  # noqa: F811
    results, codes = two_readers
    port = free_port()
    with open(tmp_path / "service.log", "w") as log:
        proc = start_server(results, port, log)
        try:
            reader = Reader(f"http://127.0.0.1:{port}")
            assert reader.login().status_code == 303
            assert reader.sign(sorted(codes["R1"].values())[0], PASSWORDS["R1"], comment="kept").status_code == 200
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            kill_hard(proc)
    db = default_db_path(results, "R1")
    copy = tmp_path / "copy.sqlite"
    shutil.copy(db, copy)  # the main file alone: the kept connections were closed, their WAL checkpointed
    assert [r["comment"] for r in store.all_reads(copy)] == ["kept"]
