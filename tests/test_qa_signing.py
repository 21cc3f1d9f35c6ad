"""Signing within a session (21 CFR 11.200(a)(1)), against the real ``khe-vol qa serve`` on waitress.

The first signing of a session is the login (account and password, scrypt);
later verdicts re-enter the password and are checked against the session's
signing verifier. These tests check what that must never change: a wrong
password is refused and counts towards the lockout, a reset makes the old
password useless at once, and logging out and in again still signs.
"""

from __future__ import annotations

import sqlite3

import pytest
import requests

from khe_vol.cli import main
from khe_vol.qa import accounts, default_db_path, store
from khe_vol.qa.app import SIGNATURE_MEANING
from khe_vol.qa.service import Sessions, load_secret_key, service_key_path
from tests.test_qa_app import READER_PASSWORD, free_port, kill_hard, package, start_server  # noqa: F401 - fixture
from tests.test_qa_service import PASSWORDS, two_readers  # noqa: F401 - the fixture

NEW_PASSWORD = "R1's password after the reset"


@pytest.fixture
def served(two_readers, tmp_path):  # noqa: F811 - the imported fixture
    """``(results, codes, base)``: the service on a free port, SIGKILLed at the end."""
    results, codes = two_readers
    port = free_port()
    with open(tmp_path / "service.log", "w") as log:
        proc = start_server(results, port, log)
        try:
            yield results, codes, f"http://127.0.0.1:{port}"
        finally:
            kill_hard(proc)


class Reader:
    """A browser-like client: one cookie jar, the session's CSRF token on every post."""

    def __init__(self, base, account="R1"):
        self.base, self.account, self.http, self.csrf = base, account, requests.Session(), None

    def login(self, password=None):
        answer = self.http.post(f"{self.base}/login", allow_redirects=False, timeout=30,
                                data={"account": self.account, "password": password or PASSWORDS[self.account]})
        if answer.status_code == 303:
            self.csrf = self.http.get(f"{self.base}/api/session", timeout=30).json()["csrf_token"]
        return answer

    def logout(self):
        return self.http.post(f"{self.base}/logout", headers={"X-CSRF-Token": self.csrf}, allow_redirects=False,
                              timeout=30)

    def sign(self, code, password, expected_revision=0, verdict="accept", **fields):
        data = {"verdict": verdict, "password": password, "expected_revision": str(expected_revision)} | fields
        return self.http.post(f"{self.base}/api/case/{code}/read", data=data, timeout=30, allow_redirects=False,
                              headers={"X-Khe-Vol": "reader", "X-CSRF-Token": self.csrf or ""})


def failed_logins(results, account="R1"):
    con = sqlite3.connect(accounts.default_accounts_path(results))
    try:
        return con.execute("SELECT failed_logins FROM accounts WHERE account = ?", (account,)).fetchone()[0]
    finally:
        con.close()


def test_a_later_signature_in_the_session_needs_the_right_password_and_a_wrong_one_counts(served):
    results, codes, base = served
    first, second, third = sorted(codes["R1"].values())[:3]
    reader = Reader(base)
    assert reader.login().status_code == 303
    assert reader.sign(first, PASSWORDS["R1"]).status_code == 200
    assert reader.sign(second, PASSWORDS["R1"]).status_code == 200  # a later signing in the same session
    # Another reader's password, an empty one, the right one with a letter changed: never signed, each counted.
    for n, wrong in enumerate((PASSWORDS["R2"], "", PASSWORDS["R1"][:-1] + "L"), start=1):
        answer = reader.sign(third, wrong)
        assert answer.status_code == 403 and "wrong account or password" in answer.json()["error"]
        assert failed_logins(results) == n
    # The right password again signs, and resets the count, as at login.
    assert reader.sign(third, PASSWORDS["R1"]).status_code == 200
    assert failed_logins(results) == 0
    # Five wrong signatures in a row lock the account: then the right password does not sign either.
    for _ in range(accounts.MAX_FAILED_LOGINS):
        assert reader.sign(first, "not the password", expected_revision=1, reason="again").status_code == 403
    locked = reader.sign(first, PASSWORDS["R1"], expected_revision=1, reason="again")
    assert locked.status_code == 403 and accounts._REFUSED in locked.json()["error"]
    assert accounts._REFUSED in Reader(base).login().text
    # The trail records each signature as before: signer, meaning, the server's time.
    db = default_db_path(results, "R1")
    for code in (first, second, third):
        (record,) = store.trail(db, code)
        assert (record["signer"], record["meaning"]) == ("R1", SIGNATURE_MEANING) and record["signed_utc"]
    assert [r["revision"] for r in store.read_history(db, first)] == [1]
    # Neither the password nor anything a guess could be tested against offline is in the accounts files.
    for path in accounts.default_accounts_path(results).parent.glob("accounts.sqlite*"):
        assert PASSWORDS["R1"].encode() not in path.read_bytes()


def test_after_a_reset_the_old_password_signs_nothing_even_in_a_session_that_was_live(served):
    results, codes, base = served
    first, second = sorted(codes["R1"].values())[:2]
    reader = Reader(base)
    reader.login()
    assert reader.sign(first, PASSWORDS["R1"]).status_code == 200
    db = accounts.default_accounts_path(results)
    token = accounts.reset_account(db, "R1")
    accounts.enrol(db, token, NEW_PASSWORD)
    # The live session is over: neither the old password nor the new one signs in it.
    assert reader.sign(second, PASSWORDS["R1"]).status_code == 401
    assert reader.sign(second, NEW_PASSWORD).status_code == 401
    assert reader.login().status_code == 401  # the old password no longer logs in
    assert reader.login(NEW_PASSWORD).status_code == 303
    answer = reader.sign(second, PASSWORDS["R1"])
    assert answer.status_code == 403 and "wrong account or password" in answer.json()["error"]
    assert reader.sign(second, NEW_PASSWORD).status_code == 200
    assert [r["case_code"] for r in store.all_reads(default_db_path(results, "R1"))] == [first, second]


def test_a_session_verifier_does_not_outlive_a_password_change(two_readers):  # noqa: F811
    """Below the gate: a session whose row is still there after a reset cannot sign with the old password."""
    results, _ = two_readers
    db = accounts.default_accounts_path(results)
    sessions = Sessions(db, load_secret_key(service_key_path(results)))
    account = accounts.authenticate(db, "R1", PASSWORDS["R1"])
    sid, _ = sessions.create("R1", account.epoch, password=PASSWORDS["R1"])
    assert sessions.sign(sid, "R1", PASSWORDS["R1"]).account == "R1"
    with pytest.raises(accounts.LoginRefused, match="wrong account or password"):
        sessions.sign(sid, "R1", PASSWORDS["R2"])
    assert failed_logins(results) == 1
    accounts.enrol(db, accounts.reset_account(db, "R1"), NEW_PASSWORD)
    for password in (PASSWORDS["R1"], NEW_PASSWORD):
        with pytest.raises(accounts.LoginRefused):
            sessions.sign(sid, "R1", password)
    # Another account's session id cannot sign for R1.
    with pytest.raises(accounts.LoginRefused, match="session ended"):
        sessions.sign(sid, "R2", PASSWORDS["R2"])


def test_after_logout_and_login_and_a_server_restart_a_signature_still_works(two_readers, tmp_path):  # noqa: F811
    results, codes = two_readers
    first, second, third = sorted(codes["R1"].values())[:3]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "service.log", "w") as log:
        proc = start_server(results, port, log)
        try:
            reader = Reader(base)
            reader.login()
            assert reader.sign(first, PASSWORDS["R1"]).status_code == 200
            old_cookies = requests.utils.dict_from_cookiejar(reader.http.cookies)
            assert reader.logout().status_code == 303
            stale = Reader(base)
            stale.http.cookies.update(old_cookies)
            stale.csrf = reader.csrf
            assert stale.sign(second, PASSWORDS["R1"]).status_code == 401  # the logged-out session signs nothing
            assert reader.login().status_code == 303
            assert reader.sign(second, PASSWORDS["R1"]).status_code == 200
            kill_hard(proc)
            proc = start_server(results, port, log)
            # The session lives in the accounts database: after a SIGKILL it still signs, with the password only.
            assert reader.sign(third, "a wrong password").status_code == 403
            assert reader.sign(third, PASSWORDS["R1"]).status_code == 200
        finally:
            kill_hard(proc)
    assert failed_logins(results) == 0
    # A sessions table from before the signing verifier gets the column.
    old = tmp_path / "old_accounts.sqlite"
    con = sqlite3.connect(old)
    con.executescript("CREATE TABLE sessions (sid_sha256 TEXT PRIMARY KEY, account TEXT NOT NULL, epoch INTEGER "
                      "NOT NULL, csrf_token TEXT NOT NULL, expires REAL NOT NULL);")
    con.close()
    Sessions(old)
    con = sqlite3.connect(old)
    assert "signing_verifier" in [r[1] for r in con.execute("PRAGMA table_info(sessions)")]
    con.close()


def test_a_refused_signature_says_how_many_tries_are_left_before_the_lockout(served):
    """Issue 24 (10): the refusal of a wrong password carries the tries left (the account is the session's)."""
    results, codes, base = served
    first = sorted(codes["R1"].values())[0]
    reader = Reader(base)
    assert reader.login().status_code == 303
    for n in range(1, accounts.MAX_FAILED_LOGINS):
        answer = reader.sign(first, "not the password")
        left = accounts.MAX_FAILED_LOGINS - n
        assert answer.status_code == 403 and answer.json()["signing"] is True
        assert answer.json()["tries_left"] == left and failed_logins(results) == n
        assert f"{left} more wrong password{'s' if left > 1 else ''} lock" in answer.json()["error"]
    last = reader.sign(first, "not the password")
    assert last.status_code == 403 and last.json()["tries_left"] == 0 and "now locked" in last.json()["error"]
    assert "locked" in reader.sign(first, PASSWORDS["R1"]).json()["error"]
    assert store.read_history(default_db_path(results, "R1"), first) == []


@pytest.mark.slow  # a real browser
def test_a_wrong_password_keeps_the_dialog_and_its_text_and_sign_and_next_is_one_step(package, tmp_path):  # noqa: F811
    """Issue 24 (10): after a wrong password the signature dialog stays open with the reason typed and the
    tries left; "Sign and next case" signs and opens the next unread case in one step."""
    from tests.test_qa_app import SIGN_DIALOG, reader_browser, sign, wait_status

    results, codes = package
    with reader_browser(results, tmp_path) as served:  # auto-advance off: only "Sign and next" moves on
        page, base = served.page, served.base
        page.goto(base + "/")
        order = page.locator("table.worklist a").all_inner_texts()
        page.goto(f"{base}/case/{order[0]}")
        page.wait_for_selector("body[data-ready='1']", timeout=30000)
        page.click("button.verdict[data-verdict='accept']")
        wait_status(page, "Current: Accept (revision 1)")
        # A revision: the reason is typed, then a wrong password.
        page.click("button.verdict[data-verdict='reject']")
        page.wait_for_selector(SIGN_DIALOG)
        page.fill("#sign-reason", "on second look: motion")
        page.fill("#sign-password", "not the password")
        page.click("#sign-confirm")
        page.wait_for_function("() => document.getElementById('sign-error').textContent.includes('wrong password')")
        assert page.is_visible(SIGN_DIALOG)
        assert page.input_value("#sign-reason") == "on second look: motion"
        assert f"{accounts.MAX_FAILED_LOGINS - 1} more wrong passwords lock" in page.inner_text("#sign-error")
        assert page.url.endswith(order[0])
        # The right password, "Sign and next case": saved, and the next unread case opens.
        page.fill("#sign-password", READER_PASSWORD)
        page.click("#sign-next")
        page.wait_for_url(f"{base}/case/{order[1]}", timeout=30000)
        page.wait_for_selector("body[data-ready='1']", timeout=30000)
    db = default_db_path(results, "R1")
    assert [r["verdict"] for r in store.read_history(db, order[0])] == ["accept", "reject"]
    assert [r["reason"] for r in store.trail(db, order[0])] == [None, "on second look: motion"]
    assert not served.errors, served.errors
