"""The reading service: login, sessions, CSRF, signed verdicts, one process for every reader.

Fast tests drive :class:`khe_vol.qa.service.ReadingService` (the WSGI app
waitress serves) with Werkzeug's client; the browser tests start the real
``khe-vol qa serve`` on waitress and log in through the real login page.
"""

from __future__ import annotations

import contextlib
import io
import re
import stat
from pathlib import Path

import pytest
from werkzeug.test import Client

from khe_vol.cli import main
from khe_vol.qa import accounts, store
from khe_vol.qa.key import read_key
from khe_vol.qa.service import ReadingService, service_key_path
from tests.qa_cohort import write_cohort

PASSWORDS = {"R1": "R1 reads slowly and well", "R2": "R2 has another password", "ADJ": "the adjudicator decides"}
LOCAL = "http://127.0.0.1"


@pytest.fixture
def two_readers(tmp_path):
    """Packages for R1 and R2 (no package for ADJ), each with an enrolled account."""
    records = write_cohort(tmp_path)
    results = tmp_path / "results"
    assert main(["qa", "package", "--results-dir", str(results), "--reader", "R1", "--reader", "R2",
                 "--seed", "987654321987", *map(str, records)]) == 0
    codes = {}
    for r in read_key(results):
        if r["case_code"]:
            codes.setdefault(r["reader"], {})[(r["participant_id"], r["session_id"])] = r["case_code"]
    db = accounts.default_accounts_path(results)
    for account, password in PASSWORDS.items():
        token = accounts.add_account(db, account, "adjudicator" if account == "ADJ" else "reader")
        accounts.enrol(db, token, password)
    return results, codes


def client_for(results):
    return Client(ReadingService(results, check_viewer=False))


def login(client, account, password=None):
    return client.post("/login", data={"account": account, "password": password or PASSWORDS[account]},
                       base_url=LOCAL)


def csrf_of(client):
    return client.get("/api/session", base_url=LOCAL).json["csrf_token"]


def post_read(client, code, csrf, **fields):
    headers = {"X-Khe-Vol": "reader"} | ({"X-CSRF-Token": csrf} if csrf else {})
    return client.post(f"/api/case/{code}/read", data=fields, headers=headers, base_url=LOCAL)


def test_reads_databases_key_and_service_files_are_owner_only(two_readers, tmp_path):
    results, _ = two_readers
    db = tmp_path / "elsewhere" / "R9.sqlite"
    store.record_read(db, "R9", "ABC123", "accept")
    # A database or key that others can read (from before the rule, or copied in) is made owner-only on use.
    (results / "reads" / "accounts.sqlite").chmod(0o644)
    old = tmp_path / "old" / "R8.sqlite"
    old.parent.mkdir()
    old.touch()
    old.chmod(0o644)
    store.record_read(old, "R8", "ABC123", "accept")
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    ReadingService(results, check_viewer=False)
    for path in (db, results / "blinding" / "key.tsv", results / "reads" / "accounts.sqlite",
                 service_key_path(results)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # The key is kept across restarts (sessions survive a restart) and is 64 hex characters.
    key = service_key_path(results).read_text()
    ReadingService(results, check_viewer=False)
    assert service_key_path(results).read_text() == key and re.fullmatch(r"[0-9a-f]{64}\n", key)


def test_login_session_csrf_and_each_reader_sees_only_their_own_cases(two_readers):
    results, codes = two_readers
    client = client_for(results)
    r1_case, r2_case = codes["R1"][("sub-01", "ses-baseline")], codes["R2"][("sub-01", "ses-baseline")]
    # Nothing without a login: pages go to the login page, the API answers 401.
    assert client.get("/", base_url=LOCAL).headers["Location"] == "/login"
    assert client.get(f"/case/{r1_case}", base_url=LOCAL).status_code == 303
    assert client.get("/api/worklist", base_url=LOCAL).status_code == 401
    assert client.get(f"/files/{r1_case}_t2.nii.gz", base_url=LOCAL).status_code == 401
    assert post_read(client, r1_case, None, verdict="accept").status_code == 401

    refused = login(client, "R1", "not the password at all")
    assert refused.status_code == 401 and "wrong account or password" in refused.get_data(as_text=True)
    answer = login(client, "R1")
    assert answer.status_code == 303 and answer.headers["Location"] == "/"
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    page = client.get("/", base_url=LOCAL).get_data(as_text=True)
    csrf = csrf_of(client)
    assert f'<meta name="csrf-token" content="{csrf}">' in page and "reader R1" in page
    assert {r["case"]["case_code"] for r in client.get("/api/worklist", base_url=LOCAL).json["rows"]} == set(
        codes["R1"].values())
    # Another reader's case, file or edited mask is not there for R1.
    assert client.get(f"/case/{r2_case}", base_url=LOCAL).status_code == 404
    assert client.get(f"/files/{r2_case}_t2.nii.gz", base_url=LOCAL).status_code == 404
    assert post_read(client, r2_case, csrf, verdict="accept", password=PASSWORDS["R1"]).status_code == 404

    # CSRF: every write needs the session's token.
    assert post_read(client, r1_case, None, verdict="accept", password=PASSWORDS["R1"]).status_code == 403
    assert post_read(client, r1_case, "x" * 43, verdict="accept", password=PASSWORDS["R1"]).status_code == 403
    assert client.post(f"/api/case/{r1_case}/prepare", base_url=LOCAL, headers={"X-Khe-Vol": "reader"}
                       ).status_code == 403
    # Another site's page is refused even with the token; so is another host name.
    assert client.post(f"/api/case/{r1_case}/read", data={"verdict": "accept"}, base_url=LOCAL,
                       headers={"X-CSRF-Token": csrf, "X-Khe-Vol": "reader", "Origin": "https://evil.example"}
                       ).status_code == 403
    assert client.post("/login", data={"account": "R1", "password": PASSWORDS["R1"]}, base_url=LOCAL,
                       headers={"Sec-Fetch-Site": "cross-site", "Origin": "null"}).status_code == 403
    assert client.get("/", base_url="http://evil.example").status_code == 403
    assert store.current_reads(results / "reads" / "R1.sqlite") == []

    # Logout ends the session on the server: the old cookie is worth nothing.
    assert client.post("/logout", data={"csrf_token": csrf}, base_url=LOCAL).headers["Location"] == "/login"
    assert client.get("/api/worklist", base_url=LOCAL).status_code == 401


def test_a_verdict_is_signed_and_a_revision_needs_a_reason(two_readers):
    results, codes = two_readers
    client = client_for(results)
    code = codes["R1"][("sub-01", "ses-baseline")]
    login(client, "R1")
    csrf = csrf_of(client)
    db = results / "reads" / "R1.sqlite"
    unsigned = post_read(client, code, csrf, verdict="accept", expected_revision="0")
    assert unsigned.status_code == 403 and "not signed" in unsigned.json["error"]
    wrong = post_read(client, code, csrf, verdict="accept", expected_revision="0", password="R2 has another password")
    assert wrong.status_code == 403 and "wrong account or password" in wrong.json["error"]
    assert store.current_reads(db) == []
    signed = post_read(client, code, csrf, verdict="accept", comment="clear margins", expected_revision="0",
                       password=PASSWORDS["R1"])
    assert signed.status_code == 200 and signed.json["current"]["revision"] == 1
    no_reason = post_read(client, code, csrf, verdict="reject", expected_revision="1", password=PASSWORDS["R1"])
    assert no_reason.status_code == 400 and "needs a reason" in no_reason.json["error"]
    revised = post_read(client, code, csrf, verdict="reject", expected_revision="1", password=PASSWORDS["R1"],
                        reason="motion on second look")
    assert revised.status_code == 200 and revised.json["current"]["revision"] == 2
    # A second post of the same page state is refused before the password is even checked.
    again = post_read(client, code, csrf, verdict="reject", expected_revision="1", password="wrong password 12",
                      reason="motion on second look")
    assert again.status_code == 409 and again.json["duplicate"]
    assert [r["verdict"] for r in store.read_history(db, code)] == ["accept", "reject"]
    # The trail: each read signed by its reader, meaning "read complete"; the revision carries its reason.
    records = store.trail(db, code)
    assert [(t["signer"], t["meaning"], t["reason"]) for t in records] == [
        ("R1", "read complete", None), ("R1", "read complete", "motion on second look")]
    assert records[1]["old_value"]["verdict"] == "accept" and records[1]["new_value"]["verdict"] == "reject"
    assert main(["qa", "verify", "--results-dir", str(results)]) == 0
    # No timestamp of the read reaches the reader's page.
    page = client.get(f"/case/{code}", base_url=LOCAL).get_data(as_text=True)
    assert not re.search(r"20\d\d-\d\d-\d\d", page)


def test_wrong_passwords_lock_the_account_and_signing_counts_too(two_readers):
    results, codes = two_readers
    client = client_for(results)
    code = codes["R1"][("sub-01", "ses-baseline")]
    login(client, "R1")
    csrf = csrf_of(client)
    for _ in range(accounts.MAX_FAILED_LOGINS - 1):
        assert login(Client(ReadingService(results, check_viewer=False)), "R1", "wrong password 12").status_code == 401
    # The fifth wrong password is a signature's: the account locks.
    assert post_read(client, code, csrf, verdict="accept", password="wrong password 12").status_code == 403
    locked = login(Client(ReadingService(results, check_viewer=False)), "R1")
    # Locked: the right password is refused with the one answer every failed login gets (which mentions locking).
    assert locked.status_code == 401 and accounts._REFUSED in locked.get_data(as_text=True)
    answer = post_read(client, code, csrf, verdict="accept", password=PASSWORDS["R1"])
    assert answer.status_code == 403 and accounts._REFUSED in answer.json["error"]


def test_disable_and_reset_end_sessions_and_enrolment_sets_a_password(two_readers, capsys):
    results, _ = two_readers
    access_log = io.StringIO()
    client = Client(ReadingService(results, check_viewer=False, access_log=access_log))
    login(client, "R2")
    assert client.get("/api/worklist", base_url=LOCAL).status_code == 200
    assert main(["qa", "disable-reader", "R2", "--results-dir", str(results)]) == 0
    assert client.get("/api/worklist", base_url=LOCAL).status_code == 401  # the session ended at once
    assert "disabled" in login(client, "R2").get_data(as_text=True)
    assert main(["qa", "enable-reader", "R2", "--results-dir", str(results)]) == 0
    login(client, "R2")
    assert client.get("/api/worklist", base_url=LOCAL).status_code == 200
    capsys.readouterr()
    assert main(["qa", "reset-reader", "R2", "--results-dir", str(results), "--public-url",
                 "https://reading.example.org"]) == 0
    link = capsys.readouterr().out.strip().splitlines()[-1]
    assert link.startswith("https://reading.example.org/enrol?token=")
    assert client.get("/api/worklist", base_url=LOCAL).status_code == 401
    token = link.split("token=", 1)[1]
    form = client.get(f"/enrol?token={token}", base_url=LOCAL).get_data(as_text=True)
    assert f'value="{token}"' in form
    differ = client.post("/enrol", data={"token": token, "password": "a new password!", "password2": "another one!!"},
                         base_url=LOCAL)
    assert differ.status_code == 400 and "differ" in differ.get_data(as_text=True)
    done = client.post("/enrol", data={"token": token, "password": "a new password!", "password2": "a new password!"},
                       base_url=LOCAL)
    assert done.status_code == 303
    assert login(client, "R2", PASSWORDS["R2"]).status_code == 401
    assert login(client, "R2", "a new password!").status_code == 303
    # The access log names who did what, never the enrolment token.
    assert token not in access_log.getvalue() and '"GET /enrol?token=***" 200' in access_log.getvalue()
    assert re.search(r' R2 "GET /api/worklist" 200\n', access_log.getvalue())
    # A new account: the link printed once; a duplicate id is refused with a message.
    assert main(["qa", "add-reader", "R3", "--results-dir", str(results)]) == 0
    assert re.fullmatch(r"/enrol\?token=[A-Za-z0-9_-]{40,}", capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["qa", "add-reader", "R3", "--results-dir", str(results)]) == 2
    assert "exists" in capsys.readouterr().err


def test_an_account_without_a_package_sees_a_clear_page(two_readers):
    results, _ = two_readers
    client = client_for(results)
    login(client, "ADJ")
    page = client.get("/", base_url=LOCAL)
    assert page.status_code == 403 and "no worklist on this server yet" in page.get_data(as_text=True)


def test_behind_tls_cookies_are_secure_and_the_public_host_is_served(two_readers):
    results, _ = two_readers
    client = Client(ReadingService(results, check_viewer=False, behind_tls=True,
                                   public_url="https://reading.example.org"))
    answer = client.post("/login", data={"account": "R1", "password": PASSWORDS["R1"]},
                         base_url="https://reading.example.org")
    assert answer.status_code == 303 and "Secure" in answer.headers["Set-Cookie"]
    assert client.get("/api/worklist", base_url="https://reading.example.org").status_code == 200
    assert client.get("/api/worklist", base_url="https://other.example.org").status_code == 403
    # An https public URL is TLS even if --behind-tls was forgotten: the cookie is Secure.
    answer = login(Client(ReadingService(results, check_viewer=False, public_url="https://reading.example.org")), "R1")
    assert answer.status_code == 303 and "Secure" in answer.headers["Set-Cookie"]


def test_the_access_log_escapes_what_a_client_chose(two_readers):
    results, _ = two_readers
    access_log = io.StringIO()
    client = Client(ReadingService(results, check_viewer=False, access_log=access_log))
    # %0A decodes to a newline in the path: unescaped, it would forge a line of its own.
    forged = '2026-01-01T00:00:00Z 203.0.113.9 R2 "POST /api/case/ABC/read" 200'
    assert client.get("/x%0A" + forged.replace(" ", "%20").replace('"', "%22"), base_url=LOCAL).status_code == 401
    lines = access_log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith('"GET /x\\x0a2026-01-01T00:00:00Z 203.0.113.9 R2 '
                                                 '\\x22POST /api/case/ABC/read\\x22 200" 401'), lines


def test_behind_tls_the_access_log_names_the_reader_the_proxy_forwards_and_no_one_else_can(two_readers, tmp_path):
    """A real server: X-Forwarded-For is believed from the loopback proxy with --behind-tls, never without."""
    import socket

    from tests.test_qa_app import free_port, kill_hard, start_server

    results, _ = two_readers
    for options, client in (((), "127.0.0.1"), (("--behind-tls", "--public-url", "https://reading.example.org"),
                                                 "203.0.113.7")):
        port, log_path = free_port(), tmp_path / f"service{len(options)}.log"
        with open(log_path, "w") as log:
            server = start_server(results, port, log, *options)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /login?probe=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: 203.0.113.7\r\n"
                          b"X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n")
                assert s.recv(64).startswith(b"HTTP/1.1 200")
        finally:
            kill_hard(server)
        (line,) = [x for x in log_path.read_text().splitlines() if "probe=1" in x]
        assert line.split(" ")[1:] == [client, "-", '"GET', '/login?probe=1"', "200"], line


# ---- the real server (waitress) and a real browser ------------------------------------------------


def start_service(results, port, log):
    """``khe-vol qa serve --results-dir R`` (every reader, behind the login) on a local port."""
    from tests.test_qa_app import start_server

    return start_server(results, port, log)


@contextlib.contextmanager
def service_browser(results, tmp_path):
    """The service on a free port and a Chromium page (not logged in): yields ``(page, base, errors)``."""
    from playwright.sync_api import sync_playwright

    from tests.test_qa_app import CHROMIUM, CHROMIUM_ARGS, free_port, kill_hard

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    port = free_port()
    with open(tmp_path / "service.log", "w") as log:
        server = start_service(results, port, log)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1300, "height": 900}, device_scale_factor=1)
                page.add_init_script("window.localStorage.setItem('khe-vol.autoAdvance', '0');")
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                yield page, f"http://127.0.0.1:{port}", errors
                browser.close()
        finally:
            kill_hard(server)


def browser_login(page, base, account, password):
    page.goto(base + "/login")
    page.fill("#account", account)
    page.fill("#password", password)
    with page.expect_navigation():
        page.click("#login")


def sign(page, password, reason=None):
    """Answer the signature dialog the verdict opened."""
    page.wait_for_selector("#sign-dialog[open]", timeout=10000)
    if reason is not None:
        page.fill("#sign-reason", reason)
    page.fill("#sign-password", password)
    page.click("#sign-confirm")


@pytest.mark.slow  # a real browser and the real server
def test_login_signed_read_revision_refused_comment_and_logout_in_a_real_browser(two_readers, tmp_path):
    from tests.test_qa_app import wait_status

    results, codes = two_readers
    code = codes["R1"][("sub-01", "ses-baseline")]
    db = results / "reads" / "R1.sqlite"
    with service_browser(results, tmp_path) as (page, base, errors):
        # Not logged in: the worklist sends the reader to the login page; a wrong password says so.
        page.goto(base + "/")
        assert page.url == base + "/login"
        browser_login(page, base, "R1", "not R1's password")
        assert page.inner_text("#error") == accounts._REFUSED
        browser_login(page, base, "R1", PASSWORDS["R1"])
        assert page.url == base + "/" and page.inner_text("#progress") == "0 of 3 read"
        assert "reader R1" in page.inner_text("header")
        # R2's case by URL: not there for R1.
        assert page.goto(f"{base}/case/{codes['R2'][('sub-01', 'ses-baseline')]}").status == 404

        page.goto(f"{base}/case/{code}")
        page.wait_for_selector("body[data-ready='1']", timeout=30000)
        # A comment the blinding forbids: refused after signing, with the word named; nothing saved.
        page.fill("#comment", "looks like sub-01 again")
        page.click("button.verdict[data-verdict='accept']")
        sign(page, PASSWORDS["R1"])
        page.wait_for_function("() => document.getElementById('error').textContent.includes(\"'sub-01'\")")
        assert "Not saved" in page.inner_text("#error") and store.read_history(db, code) == []
        # A wrong password does not sign.
        page.fill("#comment", "clear margins")
        page.click("button.verdict[data-verdict='accept']")
        sign(page, "not R1's password")
        page.wait_for_function("() => document.getElementById('error').textContent.includes('not signed')")
        assert store.read_history(db, code) == []
        # The dialog stays open, saying how many tries are left; cancelling it saves nothing either.
        assert page.is_visible("#sign-dialog[open]") and "more wrong passwords lock" in page.inner_text("#sign-error")
        assert not page.is_visible("#sign-reason")  # a first read needs no reason
        page.click("#sign-cancel")
        page.wait_for_function("() => document.getElementById('error').textContent === 'Not saved: not signed.'")
        # The signed read.
        page.click("button.verdict[data-verdict='accept']")
        sign(page, PASSWORDS["R1"])
        wait_status(page, "Current: Accept (revision 1)")
        # A revision: the dialog asks why, and will not sign without a reason.
        page.fill("#comment", "on second look: motion")
        page.click("button.verdict[data-verdict='reject']")
        page.wait_for_selector("#sign-dialog[open]")
        assert page.is_visible("#sign-reason")
        page.fill("#sign-password", PASSWORDS["R1"])
        page.click("#sign-confirm")
        assert page.inner_text("#sign-error") == "Say why the verdict changes."
        sign(page, PASSWORDS["R1"], reason="motion artefact seen on the second look")
        wait_status(page, "Current: Reject (unmeasurable) (revision 2)")
        assert [r["verdict"] for r in store.read_history(db, code)] == ["accept", "reject"]
        assert [(t["signer"], t["reason"]) for t in store.trail(db, code)] == [
            ("R1", None), ("R1", "motion artefact seen on the second look")]
        page.reload()
        page.wait_for_selector("body[data-ready='1']", timeout=30000)
        assert page.locator("#history li").count() == 2

        # Logout: back to the login page; the worklist is closed again.
        page.click("#logout")
        page.wait_for_url(base + "/login")
        page.goto(base + "/")
        assert page.url == base + "/login"
        # Repeated wrong passwords lock the account, and the page says so.
        for _ in range(accounts.MAX_FAILED_LOGINS):
            browser_login(page, base, "R2", "not R2's password")
        browser_login(page, base, "R2", PASSWORDS["R2"])
        assert page.inner_text("#error") == accounts._REFUSED and page.url == base + "/login"
    assert not errors, errors
    assert main(["qa", "verify", "--results-dir", str(results)]) == 0
