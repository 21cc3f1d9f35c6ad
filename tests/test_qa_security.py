"""Issue 24, third round: what a security review found, sent again to the real ``khe-vol qa serve``.

Each test sends the requests of a finding to the service on waitress (a
subprocess on a free port) and checks the answer and what was stored: an arm
name in a comment, comments that hid a session or a date, bodies larger than
their route can need, logins that told which accounts exist, and the
enrolment link printed whole. The redaction of a comment stored before the
comment check knew the arms, and the audit's findings file, are checked with
the real commands.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3

import pytest
import requests

from khe_vol.cli import main
from khe_vol.qa import accounts, default_db_path, store
from khe_vol.qa.leaks import Scanner, Token, study_words_path
from tests.test_qa_app import free_port, kill_hard, start_server
from tests.test_qa_service import PASSWORDS, two_readers  # noqa: F401 - the fixture
from tests.test_qa_signing import Reader

ALLOCATION = "participant_id\tarm\tsite\nsub-01\tsirolimus_prednisolone\tLyon\nsub-02\tsirolimus\tLyon\n"


def package_with_allocation(results, tmp_path):
    """Rebuild R1 and R2's packages as the workflow does: with the allocation and the arms."""
    allocation = tmp_path / "allocation.tsv"
    allocation.write_text(ALLOCATION)
    records = sorted(str(p) for p in (results / "work" / "series").rglob("record.json"))
    assert main(["qa", "package", "--results-dir", str(results), "--reader", "R1", "--reader", "R2",
                 "--seed", "987654321987", "--allocation", str(allocation), "--arm", "sirolimus_prednisolone",
                 "--arm", "sirolimus", *records]) == 0


def serve(results, tmp_path):
    port = free_port()
    with open(tmp_path / "service.log", "w") as log:
        proc = start_server(results, port, log)
        try:
            yield f"http://127.0.0.1:{port}", proc.pid
        finally:
            kill_hard(proc)


@pytest.fixture
def served(two_readers, tmp_path):  # noqa: F811 - the imported fixture
    """``(results, codes, base, server pid)``: the service as the README starts it, on a free port, SIGKILLed
    at the end."""
    results, codes = two_readers
    for base, pid in serve(results, tmp_path):
        yield results, codes, base, pid


@pytest.fixture
def served_armed(two_readers, tmp_path):  # noqa: F811 - the imported fixture
    """As :func:`served`, the packages built as the workflow builds them, with the allocation and the arms
    (the service still started without ``--allocation``)."""
    results, codes = two_readers
    package_with_allocation(results, tmp_path)
    for base, pid in serve(results, tmp_path):
        yield results, codes, base, pid


def audit(results, capsys, findings=None):
    capsys.readouterr()
    rc = main(["qa", "audit", "--results-dir", str(results)] + (["--findings", str(findings)] if findings else []))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---- 1a and 5: the comment check is the audit's, from the results folder alone ------------------------------


def test_comments_the_audit_would_flag_are_refused_by_a_server_started_without_allocation(served_armed, capsys):
    results, codes, base, _ = served_armed
    assert stat_mode(study_words_path(results)) == 0o600
    code = sorted(codes["R1"].values())[0]
    reader = Reader(base)
    assert reader.login().status_code == 303
    refused = {}
    for comment in ("patient on sirolimus", "prednisolone started", "Siro-limus", "seen in Lyon",  # arm, site
                    "compare base-line", "ｍ０６ scan", "month 6 scan", "Dec 1 2026", "1st December 2026",
                    "6-month follow-up", "sub01 again", "sub\u00ad-01", "4/5/2026", "week 12 images"):
        answer = reader.sign(code, PASSWORDS["R1"], comment=comment)
        refused[comment] = (answer.status_code, "Rephrase" in answer.json().get("error", ""))
    assert set(refused.values()) == {(400, True)}, refused
    assert store.read_history(default_db_path(results, "R1"), code) == []
    # Ordinary clinical comments are saved, and the audit passes over them.
    for n, comment in enumerate(("margin unclear on slice 12", "T2 bright rim, 3 mm", "flow voids posterior",
                                 "ill-defined, 2 lesions, may be a vessel"), start=1):
        case = sorted(codes["R1"].values())[n % 3]
        latest = max((r["revision"] for r in store.read_history(default_db_path(results, "R1"), case)), default=0)
        answer = reader.sign(case, PASSWORDS["R1"], comment=comment, expected_revision=latest,
                             reason="second look" if latest else "")
        assert answer.status_code == 200, (comment, answer.text)
    rc, out, _ = audit(results, capsys)
    assert rc == 0 and out.startswith("clean") and "arm" in out and "site" in out, out


def stat_mode(path):
    import stat

    return stat.S_IMODE(path.stat().st_mode)


def test_the_filter_normalises_unicode_and_finds_visits_and_month_name_dates():
    scanner = Scanner([Token("ses-baseline", "session"), Token("baseline", "session"), Token("m06", "session"),
                       Token("06", "month"), Token("sub-01", "participant"), Token("sirolimus", "arm")])

    def found(text):
        return sorted({leak.kind for leak in scanner.find("comment", "comment", text, strict=False)})

    for text, kinds in (("base-line", ["session"]), ("BASE LINE", ["session"]), ("ｍ０６", ["session", "visit"]),
                        ("month 6 scan", ["visit"]), ("Month-12", ["visit"]), ("visit 2", ["visit"]),
                        ("follow-up 1", ["visit"]), ("6 months", ["visit"]), ("12mo", ["visit"]),
                        ("m6", ["visit"]), ("Dec 1 2026", ["date"]), ("December 1st, 2026", ["date"]),
                        ("1 Dec 2026", ["date"]), ("the 3rd of May", ["date"]), ("Dec. 2026", ["date"]),
                        ("May 3rd", ["date"]), ("Sept. 3", ["date"]), ("3 May 2026", ["date"]),
                        ("1.12.2026", ["date"]), ("2026-12", ["date"]), ("12/2026", ["date"]),
                        ("sub\u200b-01", ["participant"]), ("ＳＵＢ－０１", ["participant"]),
                        ("siro limus", ["arm"])):
        assert found(text) == kinds, (text, found(text))
    for benign in ("margin unclear on slice 12", "T2 bright rim, 3 mm", "flow voids posterior",
                   "volume 12.06 mL, 3 of 12 read, 0.01", "may be a vessel; 2 lesions", "T1 of 3 (prior T1)",
                   "no change at 4 mm", "1.5 cm, septum 2 mm", "case K01X6M06QZ and sha 9a01f06c",
                   "decreased since prior", "volume 2019.05 mL", "lesion 1 may be a vessel",
                   "dec 3 mm since prior", "size 2 x 3 cm"):
        assert found(benign) == [], (benign, found(benign))


# ---- 1b and 1c: a comment stored before the check knew the arms ---------------------------------------------


def test_a_stored_comment_that_unblinds_is_redacted_and_the_trail_keeps_that_it_was(served_armed, capsys,
                                                                                  tmp_path):
    results, codes, base, _ = served_armed
    code = sorted(codes["R1"].values())[0]
    db = default_db_path(results, "R1")
    # As the server stored it before it knew the arms (a later revision carries it on).
    store.record_read(db, "R1", code, "accept", comment="patient on sirolimus", signer="R1")
    store.record_read(db, "R1", code, "reject", comment="patient on sirolimus, motion", signer="R1",
                      reason="motion")
    findings = tmp_path / "audit_findings.txt"
    rc, out, err = audit(results, capsys, findings)
    assert rc == 1 and f"listed in {findings}" in err
    assert findings.read_text() == out  # the list survives however the output is handled
    assert f"reads of R1: case {code} revision 1: comment contains sirolimus (arm)" in out
    assert "khe-vol qa redact" in out

    capsys.readouterr()
    assert main(["qa", "redact", "--results-dir", str(results), "--reader", "R1", "--case", code,
                 "--reason", "names an arm", "--by", "core lab (J. Doe)"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("redacted:") == 2 and "sirolimus" not in printed
    # The trail: two redaction records with the hash of what was there, who and why; the chain verifies.
    records = [t for t in store.trail(db, code) if t["action"] == "comment_redacted"]
    assert [(t["revision"], t["reason"], t["new_value"]["redacted_by"]) for t in records] == [
        (1, "names an arm", "core lab (J. Doe)"), (2, "names an arm", "core lab (J. Doe)")]
    assert records[0]["old_value"] == {"comment_sha256": hashlib.sha256(b"patient on sirolimus").hexdigest()}
    assert main(["qa", "verify", "--results-dir", str(results)]) == 0
    # Readers never see the text again: not on the page, not in the API.
    reader = Reader(base)
    assert reader.login().status_code == 303
    page = reader.http.get(f"{base}/case/{code}", timeout=30).text
    api = reader.http.get(f"{base}/api/case/{code}", timeout=30).text
    assert "sirolimus" not in page + api and store.REDACTED_COMMENT in json.loads(api)["history"][0]["comment"]
    rc, out, _ = audit(results, capsys, findings)
    assert rc == 0 and findings.read_text().startswith("clean")
    # Nothing is redacted twice; the reads themselves were never changed.
    assert main(["qa", "redact", "--results-dir", str(results), "--reader", "R1", "--case", code,
                 "--revision", "1", "--reason", "again", "--by", "core lab"]) == 2
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT comment FROM reads WHERE revision = 1").fetchone() == ("patient on sirolimus",)
    # A reader's next revision still works and links to the read, not to the redaction.
    assert reader.sign(code, PASSWORDS["R1"], verdict="accept", expected_revision=2,
                       reason="on third look").status_code == 200
    assert main(["qa", "verify", "--results-dir", str(results)]) == 0


def test_a_trail_from_before_redactions_is_upgraded_and_still_verifies(tmp_path):
    db = tmp_path / "R1.sqlite"
    con = sqlite3.connect(db)
    con.executescript(store.SCHEMA)
    for statement in store.TRAIL_STATEMENTS:  # the trail table as it was made before redactions
        con.execute(statement.replace(", 'comment_redacted'", ""))
    con.close()
    assert "comment_redacted" not in sqlite3.connect(db).execute(
        "SELECT sql FROM sqlite_master WHERE name = 'trail'").fetchone()[0]
    store.record_read(db, "R1", "K1", "accept", comment="seen at month 6")
    store.record_read(db, "R1", "K2", "reject", comment="motion")
    before = [(t["seq"], t["sha256"]) for t in store.trail(db)]
    store.redact_comment(db, "R1", "K1", 1, "names a visit", "core lab")
    assert [(t["seq"], t["sha256"]) for t in store.trail(db)][:2] == before
    assert [r["comment"] for r in store.all_reads(db)] == [store.REDACTED_COMMENT, "motion"]
    from khe_vol.qa.verify import verify_database

    assert verify_database(db).ok, verify_database(db).findings
    with sqlite3.connect(db) as con:  # still append-only
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("DELETE FROM trail WHERE action = 'comment_redacted'")
        # A redaction record altered to hash another comment is found.
        con.execute("DROP TRIGGER trail_append_only_update")
        con.execute("UPDATE trail SET old_value = ? WHERE action = 'comment_redacted'",
                    (json.dumps({"comment_sha256": "0" * 64}),))
    findings = [f.message for f in verify_database(db).findings]
    assert any("altered" in m for m in findings), findings


# ---- 3: every body capped by what its route can need --------------------------------------------------------


def server_peak_mib(pid):
    """Peak resident memory of the server process (VmHWM), MiB."""
    with open(f"/proc/{pid}/status") as fh:
        return int(re.search(r"VmHWM:\s+(\d+) kB", fh.read()).group(1)) / 1024


def test_bodies_over_what_their_route_can_need_are_refused_before_they_are_read(served):
    results, codes, base, pid = served
    code = sorted(codes["R1"].values())[0]
    reader = Reader(base)
    assert reader.login().status_code == 303
    headers = {"X-Khe-Vol": "reader", "X-CSRF-Token": reader.csrf}
    before = server_peak_mib(pid)
    big = b"verdict=accept&comment=" + b"%41" * 10_000_000  # 30 MB of percent-escapes

    def chunks():
        for i in range(0, len(big), 2**20):
            yield big[i:i + 2**20]

    answers = {
        "form": reader.http.post(f"{base}/api/case/{code}/read", data=big, timeout=60, headers=headers | {
            "Content-Type": "application/x-www-form-urlencoded"}),
        "form, chunked": reader.http.post(f"{base}/api/case/{code}/read", data=chunks(), timeout=60,
                                          headers=headers | {"Content-Type": "application/x-www-form-urlencoded"}),
        "many fields": reader.http.post(f"{base}/api/case/{code}/read", timeout=60, headers=headers,
                                        files=[(f"f{i}", (None, "A" * 400_000)) for i in range(60)]),
        "a mask larger than the case": reader.http.post(
            f"{base}/api/case/{code}/read", timeout=60, headers=headers,
            files={"verdict": (None, "edited"), "mask": ("m.nii.gz", b"\0" * 30_000_000)}),
        "clicks": reader.http.post(f"{base}/api/case/{code}/segment", data=b"x" * 3_000_000, timeout=60,
                                   headers=headers),
        "login": requests.post(f"{base}/login", data=b"account=R1&password=" + b"%41" * 1_000_000, timeout=60,
                               headers={"Content-Type": "application/x-www-form-urlencoded"}),
        "prepare": reader.http.post(f"{base}/api/case/{code}/prepare", data=b"x" * 1_000_000, timeout=60,
                                    headers=headers),
    }
    for what, answer in answers.items():
        assert answer.status_code == 413 and "larger than this action can need" in answer.text, (what, answer.text)
    # Without a session nothing past the gate is read at all.
    assert requests.post(f"{base}/api/case/{code}/read", data=big, timeout=60, headers={
        "Content-Type": "application/x-www-form-urlencoded"}).status_code == 401
    assert store.read_history(default_db_path(results, "R1"), code) == []
    assert server_peak_mib(pid) - before < 64, (before, server_peak_mib(pid))
    # What a read needs still passes: a signed comment of the longest length.
    ok = reader.sign(code, PASSWORDS["R1"], comment="é" * 5000)
    assert ok.status_code == 200, ok.text


# ---- 4: a failed login says nothing about the account --------------------------------------------------------


def test_every_failed_login_gets_the_same_answer_from_the_real_server(served):
    results, _, base, _ = served
    db = accounts.default_accounts_path(results)
    accounts.add_account(db, "R7")  # never enrolled
    assert main(["qa", "disable-reader", "R2", "--results-dir", str(results)]) == 0
    for _ in range(accounts.MAX_FAILED_LOGINS):
        Reader(base, "ADJ").login("not the adjudicator's password")

    def body(account, password):
        answer = Reader(base, account).login(password)
        assert answer.status_code == 401, (account, answer.status_code)
        return re.search(r'id="error"[^>]*>([^<]*)<', answer.text).group(1)

    answers = {"unknown": body("R9", PASSWORDS["R1"]), "wrong password": body("R1", "not R1's password!"),
               "locked, right password": body("ADJ", PASSWORDS["ADJ"]), "locked, wrong": body("ADJ", "nope"),
               "not enrolled": body("R7", "any password at all"),
               "disabled, wrong password": body("R2", "not R2's password!")}
    assert len(set(answers.values())) == 1, answers
    assert "wrong account or password" in answers["unknown"]
    # Only R2's own password learns that R2 is disabled.
    assert "disabled" in body("R2", PASSWORDS["R2"])


# ---- 11: the enrolment link printed whole --------------------------------------------------------------------


def test_add_reader_prints_the_whole_enrolment_link_once_the_service_has_run(two_readers, capsys, tmp_path):  # noqa: F811
    results, _ = two_readers
    port = free_port()
    with open(tmp_path / "service.log", "w") as log:
        proc = start_server(results, port, log, "--public-url", "https://reading.example.org")
        kill_hard(proc)
    capsys.readouterr()
    assert main(["qa", "add-reader", "R3", "--results-dir", str(results)]) == 0
    link = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"https://reading\.example\.org/enrol\?token=[A-Za-z0-9_-]{40,}", link), link
    port = free_port()
    with open(tmp_path / "service2.log", "w") as log:
        proc = start_server(results, port, log)  # no --public-url: the address it listens on
        try:
            assert main(["qa", "reset-reader", "R3", "--results-dir", str(results)]) == 0
            link = capsys.readouterr().out.strip().splitlines()[-1]
            assert link.startswith(f"http://127.0.0.1:{port}/enrol?token=")
            # The link works as printed.
            assert requests.get(link, timeout=30).status_code == 200
        finally:
            kill_hard(proc)


def test_a_reader_id_like_a_visit_is_not_a_leak(tmp_path, capsys):
    """The visit pattern finds "m1"; a reader called M1 is still named on their own folder and pages."""
    from tests.qa_cohort import write_cohort

    records = write_cohort(tmp_path)
    results = tmp_path / "results"
    assert main(["qa", "package", "--results-dir", str(results), "--reader", "M1", "--seed", "987654321987",
                 *map(str, records)]) == 0
    rc, out, _ = audit(results, capsys)
    assert rc == 0 and out.startswith("clean"), out
