"""Reader accounts: scrypt hashes, one-time enrolment, lockout, private files."""

from __future__ import annotations

import sqlite3
import stat

import pytest

from khe_vol.qa import accounts
from khe_vol.qa.accounts import AccountError, LoginRefused

PASSWORD = "correct horse battery"


def test_enrolment_login_and_the_stored_hash(tmp_path):
    db = tmp_path / "reads" / "accounts.sqlite"
    token = accounts.add_account(db, "R1", now=1000.0)
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    with pytest.raises(LoginRefused, match="enrolment link") as unenrolled:
        accounts.authenticate(db, "R1", PASSWORD, now=1001.0)
    assert str(unenrolled.value) == accounts._REFUSED  # as an unknown account: nothing said about R1
    with pytest.raises(AccountError, match="at least 12"):
        accounts.enrol(db, token, "short", now=1001.0)
    account = accounts.enrol(db, token, PASSWORD, now=1001.0)
    assert account.account == "R1" and account.role == "reader"
    with pytest.raises(LoginRefused, match="not valid"):
        accounts.enrol(db, token, PASSWORD, now=1002.0)  # spent
    assert accounts.authenticate(db, "R1", PASSWORD, now=1003.0).epoch == account.epoch
    (stored,) = sqlite3.connect(db).execute("SELECT password_hash FROM accounts").fetchone()
    assert stored.startswith("scrypt$32768$8$1$") and PASSWORD not in stored and token not in stored
    with pytest.raises(AccountError, match="exists"):
        accounts.add_account(db, "R1")


def test_wrong_password_and_unknown_account_answer_alike_and_lock_out(tmp_path):
    db = tmp_path / "accounts.sqlite"
    accounts.enrol(db, accounts.add_account(db, "R1", now=0.0), PASSWORD, now=0.0)
    with pytest.raises(LoginRefused) as unknown:
        accounts.authenticate(db, "R9", PASSWORD, now=1.0)
    for _ in range(accounts.MAX_FAILED_LOGINS):
        with pytest.raises(LoginRefused) as wrong:
            accounts.authenticate(db, "R1", PASSWORD + "x", now=1.0)
        assert str(wrong.value) == str(unknown.value)
    with pytest.raises(LoginRefused) as locked:  # even the right password, while locked
        accounts.authenticate(db, "R1", PASSWORD, now=2.0)
    assert str(locked.value) == str(unknown.value) and "locked" in str(locked.value)
    with pytest.raises(LoginRefused) as unknown_later:  # an unknown account "is locked" just the same
        accounts.authenticate(db, "R9", PASSWORD, now=2.0)
    assert str(unknown_later.value) == str(locked.value)
    assert accounts.authenticate(db, "R1", PASSWORD, now=1.0 + accounts.LOCKOUT_SECONDS + 1).account == "R1"


def test_enrolment_expires_and_reset_or_disable_ends_sessions(tmp_path):
    db = tmp_path / "accounts.sqlite"
    token = accounts.add_account(db, "ADJ", role="adjudicator", now=0.0)
    with pytest.raises(LoginRefused, match="not valid"):
        accounts.enrol(db, token, PASSWORD, now=accounts.ENROLMENT_SECONDS + 1)
    token = accounts.reset_account(db, "ADJ", now=10.0)
    epoch = accounts.enrol(db, token, PASSWORD, now=11.0).epoch
    assert accounts.current_epoch(db, "ADJ") == epoch
    accounts.set_enabled(db, "ADJ", False)
    assert accounts.current_epoch(db, "ADJ") is None
    with pytest.raises(LoginRefused) as wrong:  # disabled, but only the right password is told so
        accounts.authenticate(db, "ADJ", PASSWORD + "x", now=12.0)
    assert str(wrong.value) == accounts._REFUSED
    with pytest.raises(LoginRefused, match="disabled"):
        accounts.authenticate(db, "ADJ", PASSWORD, now=12.0)
    accounts.set_enabled(db, "ADJ", True)
    assert accounts.current_epoch(db, "ADJ") not in (None, epoch)  # sessions from before stay ended
    with pytest.raises(AccountError, match="no account"):
        accounts.reset_account(db, "R7")
    with pytest.raises(ValueError):
        accounts.add_account(db, "../etc")


def test_concurrent_guesses_get_no_more_answers_than_the_lockout_allows(tmp_path):
    import threading

    db = tmp_path / "accounts.sqlite"
    accounts.enrol(db, accounts.add_account(db, "R1", now=0.0), PASSWORD, now=0.0)
    answers, start = [], threading.Barrier(10)

    def guess(i):
        start.wait()
        try:
            accounts.authenticate(db, "R1", f"guess number {i:04d}", now=1.0)
            answers.append("in")
        except LoginRefused as exc:
            answers.append(str(exc))

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(10)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    # Ten wrong guesses at once, hashed in parallel: one answer for all; five are counted, then the account locks.
    assert answers == [accounts._REFUSED] * 10, answers
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT failed_logins, locked_until FROM accounts").fetchone() == (
            0, 1.0 + accounts.LOCKOUT_SECONDS)
    with pytest.raises(LoginRefused, match="locked"):
        accounts.authenticate(db, "R1", PASSWORD, now=2.0)


def test_the_password_hash_is_computed_outside_the_accounts_write_lock(tmp_path, monkeypatch):
    """A login hashing (~0.1 s of CPU) must not hold every other login and signature up."""
    import threading

    db = tmp_path / "accounts.sqlite"
    for account in ("R1", "R2"):
        accounts.enrol(db, accounts.add_account(db, account, now=0.0), PASSWORD, now=0.0)
    hashing, release = threading.Event(), threading.Event()
    real, released = accounts.password_matches, []

    def slow_match(password, stored):  # R1's check waits until R2 has been disabled (or 5 s)
        if password == "R1 is hashing":
            hashing.set()
            released.append(release.wait(timeout=5))  # False: the write below waited for this hash
        return real(password, stored)

    monkeypatch.setattr(accounts, "password_matches", slow_match)
    worker = threading.Thread(target=lambda: pytest.raises(LoginRefused, accounts.authenticate, db, "R1",
                                                           "R1 is hashing", now=1.0))
    worker.start()
    assert hashing.wait(timeout=30)
    accounts.set_enabled(db, "R2", False)  # a write while R1's hash is being computed
    release.set()
    worker.join(timeout=30)
    assert released == [True]
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT failed_logins FROM accounts WHERE account = 'R1'").fetchone() == (1,)


def test_every_failed_login_runs_scrypt_once_and_answers_alike(tmp_path, monkeypatch):
    """Unknown, wrong password, locked, not enrolled, disabled with a wrong password: one answer, one scrypt each.

    The runs are counted (the real scrypt still runs), never timed: a timing difference is a count difference.
    """
    import hashlib

    db = tmp_path / "accounts.sqlite"
    for name in ("R1", "R2", "R3"):
        accounts.enrol(db, accounts.add_account(db, name, now=0.0), PASSWORD, now=0.0)
    accounts.add_account(db, "R4", now=0.0)  # never enrolled
    accounts.set_enabled(db, "R3", False)
    for _ in range(accounts.MAX_FAILED_LOGINS):
        with pytest.raises(LoginRefused):
            accounts.authenticate(db, "R2", "not the password", now=1.0)
    runs, real = [], hashlib.scrypt

    def counted(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counted)
    answers = {}
    for label, name, password in (("unknown", "R9", PASSWORD), ("wrong", "R1", PASSWORD + "x"),
                                  ("locked, right password", "R2", PASSWORD), ("locked, wrong", "R2", "nope"),
                                  ("not enrolled", "R4", PASSWORD), ("disabled, wrong", "R3", PASSWORD + "x")):
        runs.clear()
        with pytest.raises(LoginRefused) as refused:
            accounts.authenticate(db, name, password, now=2.0)
        answers[label] = (str(refused.value), len(runs))
    assert set(answers.values()) == {(accounts._REFUSED, 1)}, answers
    runs.clear()
    assert accounts.authenticate(db, "R1", PASSWORD, now=2.0).account == "R1" and len(runs) == 1
